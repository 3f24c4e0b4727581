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


def test_incomplete_hub_snapshot_is_named(tmp_path, monkeypatch):
    """A cached snapshot without model_index.json (download cut short) says so."""
    hub = tmp_path / 'hub'
    monkeypatch.setenv('HF_HUB_CACHE', str(hub))
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(hub))
    repo = hub / 'models--prs-eth--marigold-depth-v1-1'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text('0' * 40)
    (repo / 'snapshots' / ('0' * 40) / 'unet').mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError, match='incomplete.*has no model_index.json'):
        resolve_model_path('prs-eth/marigold-depth-v1-1')


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


def test_partial_downloads_name_what_is_missing(tmp_path, random_model_dir):
    """An fp16-only download loads; a missing weights file or scheduler is named clearly."""
    import shutil

    copy = tmp_path / 'fp16_only'
    shutil.copytree(random_model_dir, copy)
    for part in ('unet', 'vae'):
        weights = copy / part / 'diffusion_pytorch_model.safetensors'
        weights.rename(weights.with_suffix('.fp16.safetensors'))
    parts = load_components(str(copy), torch.device('cpu'), torch.float32)
    reference = load_components(random_model_dir, torch.device('cpu'), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(parts.unet.state_dict().values(),
                                                 reference.unet.state_dict().values()))
    (copy / 'vae' / 'diffusion_pytorch_model.fp16.safetensors').unlink()
    with pytest.raises(WeightsNotFoundError, match='incomplete.*vae holds no'):
        load_components(str(copy), torch.device('cpu'), torch.float32)
    shutil.copytree(random_model_dir, tmp_path / 'no_scheduler')
    shutil.rmtree(tmp_path / 'no_scheduler' / 'scheduler')
    with pytest.raises(WeightsNotFoundError, match='scheduler_config.json is missing'):
        load_components(str(tmp_path / 'no_scheduler'), torch.device('cpu'), torch.float32)


def test_empty_prompt_from_an_fp16_only_text_encoder(tmp_path, random_model_dir, monkeypatch):
    """Without the cached embedding, an fp16-only text encoder download computes it."""
    import json
    import shutil

    from marigold_model import loading
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    monkeypatch.setattr(loading, 'CACHE_DIR', tmp_path / 'cache')
    copy = tmp_path / 'with_text_encoder'
    shutil.copytree(random_model_dir, copy)
    (copy / loading.EMPTY_TEXT_FILE).unlink()
    tokens = copy / 'tokenizer'
    tokens.mkdir()
    (tokens / 'vocab.json').write_text(json.dumps({'<|startoftext|>': 0, '<|endoftext|>': 1}))
    (tokens / 'merges.txt').write_text('#version: 0.2\n')
    CLIPTokenizer(str(tokens / 'vocab.json'), str(tokens / 'merges.txt'),
                  model_max_length=8).save_pretrained(tokens)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=2, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).eval()
    encoder.save_pretrained(copy / 'text_encoder', variant='fp16')
    parts = load_components(str(copy), torch.device('cpu'), torch.float32)
    with torch.inference_mode():
        expected = encoder(torch.tensor([[0, 1]]))[0]
    torch.testing.assert_close(parts.empty_text_embedding, expected)
    assert len(list((tmp_path / 'cache').iterdir())) == 1  # computed once, then cached


@pytest.mark.parametrize('names, variant', [
    (['diffusion_pytorch_model.safetensors'], None),
    (['diffusion_pytorch_model-00001-of-00002.safetensors',
      'diffusion_pytorch_model.safetensors.index.json'], None),
    (['diffusion_pytorch_model.fp16.safetensors'], 'fp16'),
    (['diffusion_pytorch_model.fp16-00001-of-00002.safetensors',
      'diffusion_pytorch_model.safetensors.index.fp16.json'], 'fp16'),
    (['diffusion_pytorch_model.bf16.bin'], 'bf16'),
])
def test_weights_variant_reads_diffusers_file_names(tmp_path, names, variant):
    """Plain, sharded and variant weights files give the variant diffusers must be asked for."""
    from marigold_model.loading import weights_variant
    (tmp_path / 'config.json').write_text('{}')
    for name in names:
        (tmp_path / name).write_text('')
    assert weights_variant(tmp_path) == variant


def test_a_cut_short_weights_file_is_named(tmp_path, random_model_dir):
    """A truncated safetensors file is named and called cut short, not a loader traceback."""
    import shutil

    from marigold_model.loading import WeightsDamagedError
    copy = tmp_path / 'cut'
    shutil.copytree(random_model_dir, copy)
    weights = copy / 'unet' / 'diffusion_pytorch_model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(WeightsDamagedError) as error:
        load_components(str(copy), torch.device('cpu'), torch.float32)
    message = str(error.value)
    assert str(weights) in message and 'cut short' in message
    assert f'{len(data) // 2} of {len(data)} bytes' in message
    assert 'hf download' not in message  # a local folder cannot be downloaded


def test_a_damaged_model_index_is_named(tmp_path, random_model_dir):
    """model_index.json that is not JSON is named and called damaged."""
    import shutil

    from marigold_model.loading import WeightsDamagedError
    copy = tmp_path / 'broken'
    shutil.copytree(random_model_dir, copy)
    (copy / 'model_index.json').write_text('{"_class_name": "MarigoldDepthPip')
    with pytest.raises(WeightsDamagedError, match='model_index.json.*damaged'):
        load_components(str(copy), torch.device('cpu'), torch.float32)


def test_hf_download_is_suggested_only_for_hub_ids(tmp_path, monkeypatch):
    """Local paths and bundled names get no `hf download` advice; a hub id does."""
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(tmp_path / 'hub'))
    for name in (str(tmp_path / 'absent'), './absent', 'bundled:nothing-here'):
        with pytest.raises(WeightsNotFoundError) as error:
            resolve_model_path(name)
        assert 'hf download' not in str(error.value), name
    with pytest.raises(WeightsNotFoundError, match='hf download owner/model'):
        resolve_model_path('owner/model')
