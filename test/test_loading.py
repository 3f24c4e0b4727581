"""Weight loading: local folders, bundled models, the hub cache offline, clear errors."""

from marigold_model.loading import (load_components, resolve_model_path, WeightsNotFoundError)
import pytest
import torch


def test_missing_hub_weights_say_where_and_how(tmp_path, monkeypatch):
    """An absent hub model fails at once (no network) naming the cache and the remedies."""
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(tmp_path / 'hub'))
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_model_path('prs-eth/marigold-depth-v1-1')
    message = str(error.value)
    assert 'prs-eth/marigold-depth-v1-1' in message
    assert str(tmp_path / 'hub') in message
    assert 'hf download' in message and 'local diffusers folder' in message


def test_local_paths(tmp_path, random_model_dir):
    """A diffusers folder resolves; a missing path or a non-model folder is refused clearly."""
    assert str(resolve_model_path(random_model_dir)) == random_model_dir
    with pytest.raises(WeightsNotFoundError, match='not found'):
        resolve_model_path(str(tmp_path / 'absent'))
    with pytest.raises(WeightsNotFoundError, match='model_index.json'):
        resolve_model_path(str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match='bundled:nothing-here'):
        resolve_model_path('bundled:nothing-here')


def test_components_without_text_encoder(random_model_dir):
    """Loading keeps U-Net, VAE and the cached empty-prompt embedding, no text encoder."""
    parts = load_components(random_model_dir, torch.device('cpu'), torch.float32)
    assert parts.unet.config.in_channels == 8
    assert parts.empty_text_embedding.shape == (1, 2, 32)
    assert not parts.unet.training and not any(p.requires_grad for p in parts.vae.parameters())
    assert parts.pipeline_config['default_processing_resolution'] == 64


def test_not_a_marigold_unet(tmp_path, random_model_dir):
    """A folder whose U-Net does not take image + depth latents is refused."""
    import shutil

    from diffusers import UNet2DConditionModel
    copy = tmp_path / 'sd'
    shutil.copytree(random_model_dir, copy)
    unet = UNet2DConditionModel.from_pretrained(copy, subfolder='unet')
    narrow = UNet2DConditionModel.from_config({**unet.config, 'in_channels': 4})
    narrow.save_pretrained(copy / 'unet')
    with pytest.raises(ValueError, match='not a Marigold model'):
        load_components(str(copy), torch.device('cpu'), torch.float32)
