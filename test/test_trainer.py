"""Trainer: exact resume, the paper's initialisation and objective pieces, export, bad input."""

import csv
from pathlib import Path

from marigold_model.data.sample import UnreadableSample
from marigold_model.noise import annealed_strength, pyramid_noise_like
from marigold_model.trainer import (DataSpec, load_config, lr_factor, main, TrainConfig,
                                    Trainer, TrainingError, widen_unet_input)
import numpy as np
import pytest
import torch


def _config(tmp_path, base, **changes):
    values = {'output_dir': str(tmp_path / 'run'), 'base_model': base,
              'data': (DataSpec('synthetic', '', 1.0, {'length': 64, 'seed': 3}),),
              'height': 32, 'width': 32, 'max_steps': 4, 'batch_size': 2,
              'grad_accumulation': 2, 'lr': 1e-4, 'warmup_steps': 1, 'checkpoint_every': 2,
              'log_every': 1, 'progress': False, 'export_steps': 1, 'export_resolution': 32}
    values.update(changes)
    return TrainConfig(**values)


def test_resume_repeats_the_uninterrupted_run(tmp_path, random_model_dir):
    """Stopping after two steps and resuming gives the same loss sequence as one run."""
    straight = Trainer(_config(tmp_path / 'a', random_model_dir, ema_decay=0.9))
    straight.run()
    # The same run, killed after its checkpoint at step 2 (as a crash or Ctrl-C would).
    first = Trainer(_config(tmp_path / 'b', random_model_dir, ema_decay=0.9))
    first.losses += [first.train_step(), first.train_step()]
    first.save_checkpoint()
    del first
    resumed = Trainer(_config(tmp_path / 'b', random_model_dir, ema_decay=0.9))
    restored = resumed.resume('latest')
    assert restored.name == 'step_0000002'
    assert resumed.step == 2
    resumed.run()
    assert len(straight.losses) == 4
    assert resumed.losses == straight.losses  # exact, not approximate
    for a, b in zip(straight.unet.parameters(), resumed.unet.parameters()):
        assert torch.equal(a, b)
    rows = list(csv.DictReader(open(tmp_path / 'a' / 'run' / 'log.csv')))
    assert [int(r['step']) for r in rows] == [1, 2, 3, 4]
    assert (tmp_path / 'a' / 'run' / 'config.yaml').is_file()


def test_export_loads_in_diffusers_and_our_loader(tmp_path, random_model_dir):
    """The exported model is a diffusers Marigold pipeline folder and runs in our estimator."""
    from diffusers import MarigoldDepthPipeline

    from marigold_model.config import EstimatorConfig, ModelConfig
    from marigold_model.estimator import DepthEstimator
    trainer = Trainer(_config(tmp_path, random_model_dir, max_steps=1))
    path = trainer.run()
    pipe = MarigoldDepthPipeline.from_pretrained(path, text_encoder=None, tokenizer=None)
    assert pipe.unet.config.in_channels == 8
    assert pipe.default_processing_resolution == 32
    estimator = DepthEstimator(EstimatorConfig(ModelConfig(model=str(path))))
    result = estimator.estimate(np.zeros((20, 30, 3), np.uint8))
    assert result.depth.shape == (20, 30)


def test_widened_input_conv_answers_like_stable_diffusion():
    """Copied and halved weights: the 8-channel conv on [x, x] equals the 4-channel on x."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                                up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
                                cross_attention_dim=16, layers_per_block=1, sample_size=8)
    latent = torch.randn(2, 4, 8, 8)
    before = unet.conv_in(latent)
    widen_unet_input(unet)
    assert unet.config.in_channels == 8
    assert unet.conv_in.weight.shape[1] == 8
    assert torch.allclose(unet.conv_in(torch.cat([latent, latent], 1)), before, atol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_the_final_ratio():
    """Linear warm-up, then exponential decay reaching lr_final_ratio at max_steps."""
    config = TrainConfig(max_steps=1100, warmup_steps=100, lr_final_ratio=0.01)
    assert lr_factor(0, config) == pytest.approx(0.01)
    assert lr_factor(99, config) == pytest.approx(1.0)
    assert lr_factor(100, config) == pytest.approx(1.0)
    assert lr_factor(600, config) == pytest.approx(0.1)
    assert lr_factor(1100, config) == pytest.approx(0.01)
    cosine = TrainConfig(max_steps=200, warmup_steps=0, lr_schedule='cosine', lr_final_ratio=0)
    assert lr_factor(100, cosine) == pytest.approx(0.5)


def test_pyramid_noise_is_unit_variance_and_annealed():
    """Pyramid noise has unit std and more low-frequency power than white noise."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.zeros(8, 4, 32, 32)
    noise = pyramid_noise_like(latent, 0.9, generator=generator)
    assert noise.shape == latent.shape
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)
    white = torch.randn(latent.shape, generator=generator)
    pooled = torch.nn.functional.avg_pool2d
    assert pooled(noise, 8).std() > 2 * pooled(white, 8).std()
    strength = annealed_strength(0.9, torch.tensor([0, 500, 1000]), 1000)
    assert torch.allclose(strength, torch.tensor([0.0, 0.45, 0.9]))


class _Flaky(torch.utils.data.Dataset):
    """Synthetic scenes where every third index cannot be read."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        if index % 3 == 0:
            raise UnreadableSample(f'sample {index} is corrupt')
        return self.inner[index]


def test_unreadable_samples_are_skipped_and_counted(tmp_path, random_model_dir):
    """Corrupt samples do not stop training; the count reaches the log."""
    from marigold_model.data.mixing import MixedDataset
    from marigold_model.data.synthetic import SceneConfig, SyntheticDataset
    inner = SyntheticDataset(length=30, seed=1, config=SceneConfig(height=32, width=32))
    dataset = MixedDataset([_Flaky(inner)], [1.0], length=30, seed=0)
    trainer = Trainer(_config(tmp_path, random_model_dir, max_steps=2), dataset=dataset)
    trainer.run()
    assert dataset.skipped > 0
    rows = list(csv.DictReader(open(tmp_path / 'run' / 'log.csv')))
    assert int(rows[-1]['skipped']) == dataset.skipped


def test_diverging_loss_stops_with_the_last_good_checkpoint(tmp_path, random_model_dir):
    """A non-finite loss stops the run with a clear error; earlier checkpoints are kept."""
    trainer = Trainer(_config(tmp_path, random_model_dir, max_steps=40, lr=1e30,
                              optimizer='adam', max_grad_norm=0, checkpoint_every=1))
    with pytest.raises(TrainingError, match='loss became'):
        trainer.run()
    kept = sorted((tmp_path / 'run' / 'checkpoints').glob('step_*'))
    assert kept, 'the last good checkpoint must survive'
    assert int(kept[-1].name.split('_')[1]) == trainer.step


def test_wrong_paths_and_settings_fail_at_start(tmp_path, random_model_dir, capsys):
    """Missing config, data root or base model, and unknown keys, fail before training."""
    with pytest.raises(TrainingError, match='does not exist'):
        load_config(tmp_path / 'missing.yaml')
    config_file = tmp_path / 'train.yaml'
    config_file.write_text(f'base_model: {random_model_dir}\nheight: 32\nwidth: 32\n'
                           f'output_dir: {tmp_path / "out"}\n'
                           f'data:\n  - kind: folder\n    root: {tmp_path / "nowhere"}\n')
    assert main([str(config_file)]) == 2
    assert 'nowhere' in capsys.readouterr().err
    assert main([str(config_file), 'no_such_setting=1']) == 2
    assert 'no_such_setting' in capsys.readouterr().err
    assert main([str(config_file), f'base_model={tmp_path / "no_model"}']) == 2
    assert 'no_model' in capsys.readouterr().err
    assert not Path(tmp_path / 'out' / 'checkpoints').exists()
