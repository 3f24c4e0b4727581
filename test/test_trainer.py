"""Trainer: exact resume, the paper's initialisation and objective pieces, export, bad input."""

import csv
from pathlib import Path

from marigold_model.data.sample import UnreadableSample
from marigold_model.noise import annealed_strength, pyramid_noise_like
from marigold_model.training.model_setup import widen_unet_input
from marigold_model.training.train_config import DataSpec, load_config, TrainConfig, TrainingError
from marigold_model.training.trainer import affine_fit, lr_factor, main, Trainer
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
    """Stopping after two steps and resuming gives the same losses, weights and EMA."""
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
    # The EMA (what export writes) resumes too: without ema.pt it would restart from the
    # base weights at step 2 and miss the first two updates.
    assert len(resumed.ema.shadow) == len(straight.ema.shadow) > 0
    for a, b in zip(straight.ema.shadow, resumed.ema.shadow):
        assert torch.equal(a, b)
    # It lags the live weights (decay 0.9), so the comparison above is one of its own.
    assert not all(torch.equal(a, b) for a, b in zip(straight.ema.shadow,
                                                     straight.unet.parameters()))
    rows = list(csv.DictReader(open(tmp_path / 'a' / 'run' / 'log.csv')))
    assert [int(r['step']) for r in rows] == [1, 2, 3, 4]
    assert (tmp_path / 'a' / 'run' / 'config.yaml').is_file()


def test_validation_scores_held_out_draws_with_the_exported_weights(
        tmp_path, random_model_dir):
    """Scored every val_every steps with the EMA weights, logged, and training is unchanged."""
    held_out = (DataSpec('synthetic', '', 1.0, {'length': 8, 'seed': 99}),)
    plain = Trainer(_config(tmp_path / 'plain', random_model_dir, ema_decay=0.9))
    plain.run()
    trainer = Trainer(_config(tmp_path / 'val', random_model_dir, ema_decay=0.9,
                              val_data=held_out, val_samples=6, val_every=2, log_every=3,
                              export_fp16=False))
    live = [p.detach().clone() for p in trainer.unet.parameters()]
    first = trainer.validate()
    assert trainer.validate() == first  # the same draws, timesteps and noise
    assert 0 < first[1] < 1  # an AbsRel
    assert all(torch.equal(a, b) for a, b in zip(live, trainer.unet.parameters()))
    model = trainer.run()
    assert trainer.losses == plain.losses  # validation draws nothing from the training stream
    assert [step for step, _ in trainer.val_losses] == [2, 4]
    assert [step for step, _ in trainer.val_abs_rels] == [2, 4]
    rows = list(csv.DictReader(open(tmp_path / 'val' / 'run' / 'log.csv')))
    assert [(r['step'], bool(r['val_loss']), bool(r['val_abs_rel'])) for r in rows] == [
        ('2', True, True), ('3', False, False), ('4', True, True)]
    assert float(rows[-1]['val_loss']) == pytest.approx(trainer.val_losses[-1][1], rel=1e-5)
    assert float(rows[-1]['val_abs_rel']) == pytest.approx(trainer.val_abs_rels[-1][1],
                                                           rel=1e-5)
    # The exported (EMA) weights, loaded by a second trainer without EMA, score the same.
    exported = Trainer(_config(tmp_path / 'check', str(model), val_data=held_out,
                               val_samples=6))
    assert exported.validate() == pytest.approx(
        (trainer.val_losses[-1][1], trainer.val_abs_rels[-1][1]), rel=1e-4)
    assert trainer.val_losses[-1][1] != pytest.approx(first[0], rel=1e-3)  # it trained


def test_validation_abs_rel_is_the_evaluation_protocol_on_the_one_step_estimate(
        tmp_path, random_model_dir, monkeypatch):
    """An estimate that is an affine map of the depth scores 0; a flat one, the constant's."""
    held_out = (DataSpec('synthetic', '', 1.0, {'length': 8, 'seed': 99}),)
    trainer = Trainer(_config(tmp_path, random_model_dir, val_data=held_out, val_samples=4))
    trainer.validate()
    truth = torch.from_numpy(np.nan_to_num(np.stack(trainer.val_truth)))[:, None]
    monkeypatch.setattr(trainer, 'one_step_estimate',
                        lambda rgb_latent, generators: 3 * truth[:len(generators)] - 1)
    assert trainer.validate()[1] == pytest.approx(0, abs=1e-6)
    # Flat: no scale to fit, so the best constant, the mean depth (as marigold-eval scores).
    monkeypatch.setattr(trainer, 'one_step_estimate',
                        lambda rgb_latent, generators: torch.zeros_like(truth[:len(generators)]))
    assert trainer.validate()[1] == pytest.approx(np.mean(
        [np.nanmean(np.abs(np.nanmean(depth) - depth) / depth) for depth in trainer.val_truth]))


@pytest.mark.parametrize('value, message', [
    ('5', r'val_data must be a list'), ('[{kind: nope}]', r'val_data\[0\]: unknown data kind'),
    ('[{kind: synthetic, colour: red}]', r'val_data\[0\]: unknown key'),
    ('[{kind: synthetic, probability: 0}]', r'val_data needs a source with a positive')])
def test_bad_validation_sources_are_named(value, message):
    """val_data is checked as data is, and its errors say val_data."""
    assert load_config(None, ['val_data=null']).val_data == ()
    with pytest.raises(TrainingError, match=message):
        load_config(None, [f'val_data={value}'])


def test_channels_last_trains_the_same_model(tmp_path, random_model_dir):
    """The memory layout is a speed option only: same loss and gradients, up to rounding."""
    runs = {}
    for layout in (True, False):
        trainer = Trainer(_config(tmp_path / str(layout), random_model_dir,
                                  channels_last=layout))
        assert trainer.unet.conv_in.weight.is_contiguous(
            memory_format=torch.channels_last) == layout
        numbers = list(range(4))
        latents = trainer.encode_samples(numbers)[:3]
        error, count = trainer.compute_loss(*latents, trainer.sample_generators(numbers))
        error.backward()
        runs[layout] = error.item() / count, [p.grad for p in trainer.unet.parameters()]
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    # Gradients that are rounding noise (a few 1e-6) differ in full; measured against the
    # largest gradient, every difference is a rounding one.
    largest = max(float(g.abs().max()) for g in runs[False][1])
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * largest)


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


# ---- data stream -------------------------------------------------------------------------------


class _ScaledDepthFrames(torch.utils.data.Dataset):
    """Frames larger than the training size, depth growing to the right (flips are visible)."""

    def __init__(self, n, size=40, empty=(), broken=()):
        rows, cols = np.mgrid[0:size, 0:size]
        self.n, self.empty, self.broken = n, set(empty), set(broken)
        self.depth = 1.0 + cols + 0.01 * rows
        self.rgb = np.stack([cols * 6, rows * 6, cols * 0], axis=-1).astype(np.uint8)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from marigold_model.data.sample import intrinsics_from_hfov, make_sample
        if i in self.broken:
            raise UnreadableSample(f'frame {i} is corrupt')
        depth = np.zeros_like(self.depth) if i in self.empty else self.depth * (1 + i)
        return make_sample(self.rgb, depth, intrinsics_from_hfov(40, 40, 60.0), f'frame:{i}')


def _stream(source, seed=0, size=32):
    from marigold_model.data.mixing import MixedDataset, TrainTransform
    return MixedDataset([source], [1.0], length=len(source), seed=seed,
                        transform=TrainTransform(size, size))


def _record_samples(monkeypatch):
    import marigold_model.training.trainer as trainer_module
    seen = []
    original = trainer_module.sample_to_tensors

    def recording(sample, config):
        seen.append((sample.name, sample.depth.tobytes()))
        return original(sample, config)
    monkeypatch.setattr(trainer_module, 'sample_to_tensors', recording)
    return seen


def test_training_draws_every_frame_once_per_pass_with_new_crops(tmp_path, random_model_dir,
                                                                 monkeypatch):
    """Each step (4 draws) is one pass over 4 frames; crops / flips differ between passes."""
    seen = _record_samples(monkeypatch)
    trainer = Trainer(_config(tmp_path / 'a', random_model_dir, max_steps=6),
                      dataset=_stream(_ScaledDepthFrames(4)))
    for _ in range(6):
        trainer.train_step()
    assert len(seen) == 24
    for step in range(6):
        names = sorted(name for name, _ in seen[4 * step:4 * step + 4])
        assert names == [f'frame:{i}' for i in range(4)]
    for frame in range(4):
        variants = [data for name, data in seen if name == f'frame:{frame}']
        assert len(set(variants)) > 1  # not the same crop and flip every pass
    # The same seed draws the same sequence (what makes a resumed run exact).
    first = list(seen)
    seen.clear()
    twin = Trainer(_config(tmp_path / 'b', random_model_dir, max_steps=6),
                   dataset=_stream(_ScaledDepthFrames(4)))
    for _ in range(6):
        twin.train_step()
    assert seen == first


def test_latent_cache_serves_only_exact_repeats(tmp_path, random_model_dir):
    """Cached (and prefilled) latents give the losses of a run that encodes every draw."""
    def losses(**changes):
        trainer = Trainer(_config(tmp_path / str(len(changes)), random_model_dir, max_steps=4,
                                  **changes), dataset=_stream(_ScaledDepthFrames(3, size=32)))
        if changes.get('prefill_cache'):
            trainer.prefill_latent_cache()
            assert len(trainer.latent_cache) == 6  # 3 frames x 2 flips
        return [trainer.train_step() for _ in range(4)]
    plain = losses()
    assert np.allclose(losses(cache_latents=True), plain, rtol=1e-4)
    assert np.allclose(losses(cache_latents=True, prefill_cache=True), plain, rtol=1e-4)


def _timesteps_drawn(trainer, draws):
    """Timesteps the U-Net is called with over ``draws`` samples of one compute_loss call."""
    seen = []
    unet = trainer.unet

    def recording(sample, timesteps, **kwargs):
        seen.extend(int(t) for t in timesteps)
        return unet(sample, timesteps, **kwargs)
    trainer.unet = recording
    latent = torch.zeros(draws, 4, 4, 4)
    trainer.compute_loss(latent, latent, latent.bool(), trainer.sample_generators(range(draws)))
    return seen


def test_final_timestep_share_trains_the_one_step_estimate(tmp_path, random_model_dir):
    """A share of draws moves to the last timestep; the others keep their uniform draws."""
    def timesteps(share):
        trainer = Trainer(_config(tmp_path / str(share), random_model_dir,
                                  final_timestep_share=share))
        return _timesteps_drawn(trainer, 64)
    uniform, half, every = timesteps(0.0), timesteps(0.5), timesteps(1.0)
    last = 999  # the scheduler's num_train_timesteps - 1
    assert every == [last] * 64
    assert uniform.count(last) <= 1
    moved = [i for i, (a, b) in enumerate(zip(uniform, half)) if a != b]
    assert all(half[i] == last for i in moved)  # a draw either keeps its timestep or moves
    assert 20 <= half.count(last) <= 44  # about half of 64 (binomial: 3 sigma is 32 +- 12)


def test_affine_fit_is_least_squares_on_valid_pixels_only():
    """Per-sample scale and shift as numpy's lstsq finds them; invalid pixels play no part."""
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 6, 5, generator=generator) * 2 - 1
    valid = torch.rand(3, 1, 6, 5, generator=generator) > 0.3
    exact = (target - 0.25) / 3.0
    exact[~valid] = 100.0
    assert torch.allclose(affine_fit(exact, target, valid)[valid], target[valid], atol=1e-5)
    noisy = torch.rand(3, 1, 6, 5, generator=generator)
    aligned = affine_fit(noisy, target, valid)
    for row in range(3):
        mask = valid[row].numpy()
        x = noisy[row].numpy()[mask].astype(np.float64)
        design = np.stack([x, np.ones_like(x)], axis=1)
        (scale, shift), *_ = np.linalg.lstsq(design, target[row].numpy()[mask], rcond=None)
        np.testing.assert_allclose(aligned[row].numpy(), scale * noisy[row].numpy() + shift,
                                   atol=1e-5)
    flat = affine_fit(torch.full_like(target, 0.7), target, valid)
    for row in range(3):  # nothing to fit: the target's mean
        assert torch.allclose(flat[row], target[row][valid[row]].mean())


def test_affine_depth_steps_train_the_decoded_one_step_estimate(tmp_path, random_model_dir):
    """The last steps score the VAE-decoded clean latent of the last timestep, affinely fitted."""
    trainer = Trainer(_config(tmp_path, random_model_dir, affine_depth_steps=2))
    modes = []
    for _ in range(4):
        modes.append(trainer.trains_affine_depth())
        assert np.isfinite(trainer.train_step())
    assert modes == [False, False, True, True]

    numbers = list(range(3))
    rgb_latent, _, _, _, depth, valid = trainer.encode_samples(numbers)
    valid[0, :, :4] = False  # some invalid pixels
    seen = {}
    unet = trainer.unet

    def recording(sample, timesteps, **kwargs):
        seen.update(sample=sample, timesteps=timesteps)
        seen['velocity'] = unet(sample, timesteps, **kwargs)[0]
        return (seen['velocity'],)
    trainer.unet = recording
    error, count = trainer.compute_affine_depth_loss(rgb_latent, depth, valid,
                                                     trainer.sample_generators(numbers))
    assert seen['timesteps'].tolist() == [999] * 3  # the one-step estimate's timestep
    assert torch.equal(seen['sample'][:, :4], rgb_latent)
    # Independently: x0 from v at the last timestep, decoded, channel mean, lstsq per sample.
    alpha = trainer.scheduler.alphas_cumprod[999].double()
    noisy, velocity = seen['sample'][:, 4:].double(), seen['velocity'].double()
    clean = alpha.sqrt() * noisy - (1 - alpha).sqrt() * velocity
    with torch.no_grad():
        decoded = trainer.vae.decode((clean / trainer.vae.config.scaling_factor).float()).sample
    estimate = decoded.mean(dim=1).numpy()
    errors = []
    for row in range(3):
        mask = valid[row, 0].numpy()
        x = estimate[row][mask].astype(np.float64)
        design = np.stack([x, np.ones_like(x)], axis=1)
        y = depth[row, 0].numpy()[mask]
        (scale, shift), *_ = np.linalg.lstsq(design, y, rcond=None)
        errors.append(np.abs(scale * x + shift - y))
    assert count == sum(len(e) for e in errors) == int(valid.sum())
    assert error.item() / count == pytest.approx(np.concatenate(errors).mean(), rel=1e-4)
    # The gradient reaches the U-Net through the frozen decoder, which itself stays frozen.
    error.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert all(p.grad is None for p in trainer.vae.parameters())


# ---- learning rate -----------------------------------------------------------------------------


def test_lr_follows_the_step_on_many_processes_and_skipped_steps(tmp_path, random_model_dir,
                                                                 monkeypatch):
    """Every optimiser step uses lr * lr_factor(step): 4 processes or skipped fp16 steps."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, PartialState
    config = _config(tmp_path, random_model_dir, max_steps=8, warmup_steps=2,
                     lr_schedule='exponential', lr_final_ratio=0.01, grad_accumulation=1)
    trainer = Trainer(config)
    used = []
    inner = trainer.optimizer.optimizer
    original = inner.step

    def recording_step(*args, **kwargs):
        used.append(inner.param_groups[0]['lr'])
        return original(*args, **kwargs)
    monkeypatch.setattr(inner, 'step', recording_step)
    for state in (PartialState, AcceleratorState):  # AcceleratorState() copies PartialState
        monkeypatch.setitem(state._shared_state, 'num_processes', 4)
    assert trainer.accelerator.num_processes == 4
    for _ in range(3):
        trainer.train_step()
    # fp16 loss scaling skips optimiser steps on overflow; the step count still moves on.
    monkeypatch.setattr(AcceleratedOptimizer, 'step_was_skipped', property(lambda self: True))
    for _ in range(3):
        trainer.train_step()
    assert trainer.step == 6
    assert used == pytest.approx([config.lr * lr_factor(step, config) for step in range(6)])
    assert trainer.optimizer.param_groups[0]['lr'] == pytest.approx(
        config.lr * lr_factor(5, config))


# ---- exported scheduler ------------------------------------------------------------------------


def test_export_keeps_the_training_noise_schedule(tmp_path, random_model_dir):
    """A base without zero-SNR rescaling exports a scheduler with the trained alphas."""
    import json
    import shutil

    from diffusers import DDIMScheduler
    base = tmp_path / 'base'
    shutil.copytree(random_model_dir, base)
    config_file = base / 'scheduler' / 'scheduler_config.json'
    values = json.loads(config_file.read_text())
    values.update(rescale_betas_zero_snr=False, beta_schedule='linear', beta_start=0.0001,
                  beta_end=0.02, prediction_type='epsilon')
    config_file.write_text(json.dumps(values))
    trainer = Trainer(_config(tmp_path, str(base), max_steps=1))
    path = trainer.run()
    exported = DDIMScheduler.from_pretrained(path, subfolder='scheduler')
    assert not exported.config.rescale_betas_zero_snr
    assert exported.config.prediction_type == 'v_prediction'  # what the trainer taught
    assert torch.allclose(exported.alphas_cumprod, trainer.scheduler.alphas_cumprod)
    assert exported.alphas_cumprod[-1] > 1e-5  # not the zero-SNR schedule (about 0)


# ---- samples without depth ---------------------------------------------------------------------


def test_samples_without_valid_depth_are_counted_not_fatal(tmp_path, random_model_dir):
    """All-invalid frames are masked out and counted; the count survives a resume."""
    trainer = Trainer(_config(tmp_path, random_model_dir, max_steps=2),
                      dataset=_stream(_ScaledDepthFrames(4, empty=(1, 3))))
    trainer.run()
    assert trainer.no_depth == 4  # two passes over four frames, two of them empty
    rows = list(csv.DictReader(open(tmp_path / 'run' / 'log.csv')))
    assert [int(r['no_depth']) for r in rows] == [2, 4]
    resumed = Trainer(_config(tmp_path, random_model_dir, max_steps=2),
                      dataset=_stream(_ScaledDepthFrames(4, empty=(1, 3))))
    resumed.resume('latest')
    assert resumed.no_depth == 4


# ---- configuration -----------------------------------------------------------------------------


def test_config_values_get_their_types_and_bad_keys_are_named(tmp_path, capsys):
    """YAML 3e-5 is a number; misspelt data keys and reader options fail by name, early."""
    config_file = tmp_path / 'train.yaml'
    config_file.write_text('lr: 3e-5\nmax_steps: 1e3\nmixed_precision: no\nheight: 64\n')
    config = load_config(config_file)
    assert isinstance(config.lr, float) and config.lr == pytest.approx(3e-5)
    assert config.max_steps == 1000 and isinstance(config.max_steps, int)
    assert config.mixed_precision == 'no'
    with pytest.raises(TrainingError, match='lr'):
        load_config(None, ['lr=fast'])
    with pytest.raises(TrainingError, match='max_steps'):
        load_config(None, ['max_steps=2.5'])
    with pytest.raises(TrainingError, match="'path'"):
        load_config(None, ['data=[{kind: folder, path: /data}]'])
    with pytest.raises(TrainingError, match='depth_scal'):
        load_config(None, ['data=[{kind: folder, root: /data, options: {depth_scal: 0.001}}]'])
    with pytest.raises(TrainingError, match='rgb_topic'):
        load_config(None, ['data=[{kind: bag, root: /data.bag, options: {depth_topic: d}}]'])
    with pytest.raises(TrainingError, match='fov'):
        load_config(None, ['data=[{kind: synthetic, options: {scene: {fov: [40, 50]}}}]'])
    # Reported by the command line before any model is looked at (this one does not exist).
    config_file.write_text(f'base_model: {tmp_path / "no_model"}\n'
                           'data:\n  - kind: folder\n    path: /data\n')
    assert main([str(config_file)]) == 2
    error = capsys.readouterr().err
    assert "'path'" in error and 'no_model' not in error


@pytest.mark.parametrize('setting, value', [
    ('checkpoint_every', 0), ('log_every', 0), ('keep_checkpoints', 0), ('ema_decay', 1.0),
    ('ema_decay', 1.5), ('lr_final_ratio', 0), ('lr_final_ratio', -0.5),
    ('depth_high_percentile', 98), ('depth_low_percentile', 2), ('lr', 0), ('height', 36),
    ('final_timestep_share', 1.5), ('final_timestep_share', -0.1),
    ('affine_depth_steps', -1), ('affine_depth_steps', 30001), ('val_every', 0),
    ('val_samples', 0)])
def test_settings_that_cannot_work_are_refused_by_name(setting, value):
    """Zero intervals, EMA decay >= 1, a zero final ratio, percentages: refused up front."""
    with pytest.raises(TrainingError, match=setting):
        load_config(None, [f'{setting}={value}'])


# ---- noise -------------------------------------------------------------------------------------


def _reference_multi_res_noise(x, strength, generator):
    """Marigold's multi_res_noise_like ('original'), transcribed loop for loop."""
    if torch.is_tensor(strength):
        strength = strength.reshape((-1, 1, 1, 1))
    b, c, w, h = x.shape
    up_sampler = torch.nn.Upsample(size=(w, h), mode='bilinear')
    noise = torch.randn(x.shape, device=x.device, generator=generator)
    for i in range(10):
        r = torch.rand(1, generator=generator, device=x.device) * 2 + 2
        w, h = max(1, int(w / (r ** i))), max(1, int(h / (r ** i)))
        noise += up_sampler(torch.randn(b, c, w, h, generator=generator).to(x)) * strength ** i
        if w == 1 or h == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize('shape', [(2, 4, 32, 32), (3, 4, 12, 20), (1, 4, 96, 64)])
def test_pyramid_noise_matches_marigold_draw_for_draw(shape):
    """Same generator, same noise as the reference, including its full-size level 0."""
    latent = torch.zeros(shape)
    for strength in (0.9, torch.linspace(0.0, 0.9, shape[0]), 0.0):
        ours = pyramid_noise_like(latent, strength, generator=torch.Generator().manual_seed(5))
        reference = _reference_multi_res_noise(latent, strength,
                                               torch.Generator().manual_seed(5))
        assert torch.equal(ours, reference)


# ---- export ------------------------------------------------------------------------------------


def test_export_leaves_the_live_model_alone_and_replaces_the_folder_whole(
        tmp_path, random_model_dir, monkeypatch):
    """fp16 export does not round the training weights; a failed export keeps the old one."""
    import safetensors.torch

    from marigold_model.loading import EMPTY_TEXT_FILE
    trainer = Trainer(_config(tmp_path, random_model_dir, max_steps=3, export_fp16=True))
    trainer.train_step()
    live = [p.detach().clone() for p in list(trainer.unet.parameters())
            + list(trainer.vae.parameters())]
    path = trainer.export(tmp_path / 'model')
    after = list(trainer.unet.parameters()) + list(trainer.vae.parameters())
    assert all(torch.equal(a, b) for a, b in zip(live, after))
    assert trainer.vae.dtype == torch.float32
    weights = safetensors.torch.load_file(path / 'unet' / 'diffusion_pytorch_model.safetensors')
    assert all(t.dtype == torch.float16 for t in weights.values())
    for part in ('model_index.json', 'unet/config.json', 'vae/config.json',
                 'scheduler/scheduler_config.json', EMPTY_TEXT_FILE, 'marigold_ros.json'):
        assert (path / part).is_file()
    before = {f: f.read_bytes() for f in path.rglob('*') if f.is_file()}
    # Train on, then an export that dies while writing (disk full, Ctrl-C, ...).
    trainer.train_step()
    original = safetensors.torch.save_file

    def failing(tensors, filename, *args, **kwargs):
        if str(filename).endswith(EMPTY_TEXT_FILE):
            raise OSError('no space left on device')
        return original(tensors, filename, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, 'save_file', failing)
    with pytest.raises(OSError, match='no space'):
        trainer.export(path)
    assert {f: f.read_bytes() for f in path.rglob('*') if f.is_file()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith('.')]
    monkeypatch.undo()
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError):
        trainer.export(tmp_path / 'other')
    assert (tmp_path / 'other' / 'notes.txt').read_text() == 'mine'


# ---- resume and export-only --------------------------------------------------------------------


def test_resume_restores_counts_without_repeating_log_rows(tmp_path, random_model_dir):
    """Skipped count restored, no duplicate log rows, and a checkpoint at max_steps."""
    def trainer(folder):
        return Trainer(_config(tmp_path / folder, random_model_dir, max_steps=5,
                               checkpoint_every=2, keep_checkpoints=3),
                       dataset=_stream(_ScaledDepthFrames(6, broken=(0, 4))))

    straight = trainer('a')
    straight.run()
    crashing = trainer('b')
    original = crashing.train_step

    def crash_in_step_four():
        if crashing.step == 3:
            raise KeyboardInterrupt
        return original()
    crashing.train_step = crash_in_step_four
    with pytest.raises(KeyboardInterrupt):
        crashing.run()  # logged step 3, last checkpoint at step 2
    resumed = trainer('b')
    resumed.resume('latest')
    assert resumed.step == 2
    assert resumed._skipped() > 0
    resumed.run()

    def log(folder):
        return list(csv.DictReader(open(tmp_path / folder / 'run' / 'log.csv')))
    rows_a, rows_b = log('a'), log('b')
    assert [int(r['step']) for r in rows_b] == [1, 2, 3, 4, 5]
    for a, b in zip(rows_a, rows_b):
        assert (a['step'], a['loss'], a['skipped']) == (b['step'], b['loss'], b['skipped'])
    assert resumed.losses == straight.losses
    kept = sorted(p.name for p in (tmp_path / 'b' / 'run' / 'checkpoints').glob('step_*'))
    assert kept == ['step_0000002', 'step_0000004', 'step_0000005']


def test_export_only_exports_the_trained_checkpoint(tmp_path, random_model_dir, capsys):
    """--export-only needs a checkpoint (the latest by default), never the untrained base."""
    import safetensors.torch
    config_file = tmp_path / 'train.yaml'
    config_file.write_text(f'base_model: {random_model_dir}\nheight: 32\nwidth: 32\n'
                           f'output_dir: {tmp_path / "run"}\nmax_steps: 2\nbatch_size: 2\n'
                           'grad_accumulation: 1\nlr: 0.001\nwarmup_steps: 0\nprogress: false\n'
                           'checkpoint_every: 2\nexport_resolution: 32\n'
                           'data:\n  - kind: synthetic\n    options: {length: 8}\n')
    assert main([str(config_file), '--export-only']) == 2
    assert 'no checkpoint' in capsys.readouterr().err
    assert not (tmp_path / 'run' / 'model').exists()
    trainer = Trainer(load_config(config_file))
    for _ in range(2):
        trainer.train_step()
    trainer.save_checkpoint()
    assert main([str(config_file), '--export-only']) == 0
    exported = safetensors.torch.load_file(
        tmp_path / 'run' / 'model' / 'unet' / 'diffusion_pytorch_model.safetensors')
    base = safetensors.torch.load_file(
        Path(random_model_dir) / 'unet' / 'diffusion_pytorch_model.safetensors')
    trained = trainer.accelerator.unwrap_model(trainer.unet).state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in exported)
    assert not all(torch.equal(exported[k], base[k]) for k in exported)


# ---- several processes -------------------------------------------------------------------------


def _rgbd_folder(root, frames=6, size=40, empty=(1,), broken=(4,)):
    """Write an RGB-D folder: ``empty`` frames have no valid depth, ``broken`` ones bad sizes."""
    from PIL import Image
    rows, cols = np.mgrid[0:size, 0:size]
    for folder in ('rgb', 'depth'):
        (root / folder).mkdir(parents=True)
    for i in range(frames):
        rgb = np.stack([cols * 6, rows * 6, np.full_like(cols, 40 * i)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / 'rgb' / f'f{i}.png')
        depth = (1.0 + cols + 0.3 * i * rows).astype(np.float32)
        if i in empty:
            depth[:] = 0
        if i in broken:
            depth = depth[:-1]  # sizes of rgb and depth differ: unreadable
        np.save(root / 'depth' / f'f{i}.npy', depth)
    return root


def _launch(processes, *args):
    """Run marigold-train under ``accelerate launch`` with several CPU processes (gloo)."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    # --cpu would start one process (accelerate's simple launcher); --multi_gpu starts them
    # all, and the trainer joins them on the CPU when there is no GPU.
    command = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu',
               '--num_processes', str(processes), '--num_machines', '1',
               '--mixed_precision', 'no', '--dynamo_backend', 'no',
               '--main_process_port', str(port), '-m', 'marigold_model.training.trainer',
               *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    # Each rank's own error first: the launcher's tail only says that a rank failed.
    errors = [line for line in done.stderr.splitlines() if 'Error' in line or '[rank' in line]
    assert done.returncode == 0, '\n'.join(errors[:40]) + '\n...\n' + done.stderr[-2000:]
    return done


def _state(run, step):
    import json
    return json.loads((run / 'checkpoints' / f'step_{step:07d}' / 'trainer_state.json')
                      .read_text())


def test_two_processes_train_as_one_with_twice_the_batch(tmp_path, random_model_dir):
    """
    Two gloo processes of batch 1 give the losses and counts of one process of batch 2.

    Each process draws, encodes and noises its half of every micro-batch exactly as the one
    process does (draws and noise are keyed by draw number), and the loss is the masked MSE
    over the pixels of both halves. What may differ is summation order only: a squared-error
    sum over 1 + 1 samples added in float64 across processes, against one float32 sum over 2,
    and gradients summed over the batch inside one convolution's backward against two halves
    averaged by the all-reduce: float32 rounding (about 6e-8 relative per operation), which
    four Adam steps at lr 1e-4 carry into the losses at far below the 1e-5 allowed (5e-8
    measured).
    """
    data = _rgbd_folder(tmp_path / 'data')
    config_file = tmp_path / 'train.yaml'
    config_file.write_text(
        f'base_model: {random_model_dir}\nheight: 32\nwidth: 32\nmax_steps: 4\nbatch_size: 1\n'
        'grad_accumulation: 2\nlr: 0.0001\nwarmup_steps: 1\ncheckpoint_every: 2\n'
        'log_every: 1\nprogress: false\nexport_resolution: 32\n'
        f'data:\n  - kind: folder\n    root: {data}\n')
    two = tmp_path / 'two'
    _launch(2, config_file, f'output_dir={two}')
    one = Trainer(load_config(config_file, [f'output_dir={tmp_path / "one"}', 'batch_size=2']))
    one.run()
    state = _state(two, 4)
    assert (state['processes'], state['batch_size']) == (2, 1)
    assert state['losses'] == pytest.approx(one.losses, rel=1e-5, abs=0)
    # Counts are summed over the processes: the log of the two reads like the one's.
    rows_two = list(csv.DictReader(open(two / 'log.csv')))
    rows_one = list(csv.DictReader(open(tmp_path / 'one' / 'log.csv')))
    counts = [(r['step'], r['skipped'], r['no_depth']) for r in rows_two]
    assert counts == [(r['step'], r['skipped'], r['no_depth']) for r in rows_one]
    assert int(rows_two[-1]['skipped']) > 0 and int(rows_two[-1]['no_depth']) > 0
    assert [float(r['loss']) for r in rows_two] == pytest.approx(one.losses, abs=2e-6)
    # Resumed by two processes from the step-2 checkpoint: the uninterrupted run, exactly.
    resumed = tmp_path / 'resumed'
    _launch(2, config_file, f'output_dir={resumed}', '--resume',
            two / 'checkpoints' / 'step_0000002')
    assert _state(resumed, 4)['losses'] == state['losses']
    assert _state(resumed, 4)['skipped'] == state['skipped']
    unet = Path('model') / 'unet' / 'diffusion_pytorch_model.safetensors'
    assert (resumed / unet).read_bytes() == (two / unet).read_bytes()
    # One process of batch 2 takes over the two processes' run (same samples per step) ...
    taken = Trainer(load_config(config_file, [f'output_dir={tmp_path / "taken"}',
                                              'batch_size=2']))
    taken.resume(two / 'checkpoints' / 'step_0000002')
    taken.run()
    assert taken.losses == pytest.approx(state['losses'], rel=1e-5, abs=0)
    # ... but one of batch 1 would move the data stream: refused, naming both layouts.
    halved = Trainer(load_config(config_file, [f'output_dir={tmp_path / "halved"}']))
    with pytest.raises(TrainingError) as refusal:
        halved.resume(two / 'checkpoints' / 'step_0000002')
    message = str(refusal.value)
    assert '2 processes x batch_size 1' in message and '1 process x batch_size 1' in message
    assert 'batch_size=2 on 1 process' in message
    assert halved.step == 0


def test_changed_batch_layout_is_refused_on_resume_but_exports(tmp_path, random_model_dir,
                                                               capsys):
    """A checkpoint resumed with another batch size or accumulation is refused by name."""
    config_file = tmp_path / 'train.yaml'
    config_file.write_text(f'base_model: {random_model_dir}\nheight: 32\nwidth: 32\n'
                           f'output_dir: {tmp_path / "run"}\nmax_steps: 2\nbatch_size: 2\n'
                           'grad_accumulation: 2\nprogress: false\nexport_resolution: 32\n'
                           'data:\n  - kind: synthetic\n    options: {length: 8}\n')
    trainer = Trainer(load_config(config_file))
    trainer.train_step()
    trainer.save_checkpoint()
    for change, then, now in (('batch_size=4', 'batch_size 2', 'batch_size 4'),
                              ('grad_accumulation=1', 'grad_accumulation 2',
                               'grad_accumulation 1')):
        assert main([str(config_file), change, '--resume']) == 2
        error = capsys.readouterr().err
        assert 'cannot resume' in error and then in error and now in error
        assert 'batch_size=2 on 1 process and grad_accumulation=2' in error
    assert not (tmp_path / 'run' / 'model').exists()
    # Exporting a checkpoint does not continue the stream: any layout may export it.
    assert main([str(config_file), 'batch_size=4', '--export-only']) == 0
    assert (tmp_path / 'run' / 'model' / 'model_index.json').is_file()
