"""
Fine-tune Marigold on synthetic RGB-D data (the paper's recipe), on one CPU or many GPUs.

Usage::

    marigold-train CONFIG.yaml [key=value ...]
    accelerate launch -m marigold_model.training.trainer CONFIG.yaml [key=value ...]

The U-Net learns v-prediction on DDPM with annealed multi-resolution noise; the VAE is frozen.
Each draw of the data stream is seeded by (seed, draw number), so a resumed run repeats an
uninterrupted one exactly, and N processes of batch B train as one of batch N x B.
"""

import contextlib
import json
import math
import os
from pathlib import Path
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .evaluate import score_image
from .model_setup import ExponentialAverage, export_scheduler_config, load_base
from .model_setup import training_scheduler
from .run_log import RunLog
from .train_config import config_to_dict, load_config, TrainingError
from .training_data import build_training_data, build_validation_data, draw_numbers
from .training_data import sample_to_tensors
from ..alignment import AlignmentError
from ..architecture import save_marigold
from ..guidance import original_and_noise
from ..loading import resolve_model_path
from ..noise import annealed_strength, pyramid_noise_like

# Key of the per-draw timestep / noise generators (the data's own keys are 0 to 3).
_NOISE_STREAM = 101
_VAL_NOISE_STREAM = 102
_VAL_ESTIMATE_STREAM = 103


def lr_factor(step, config):
    """Return the factor on config.lr at a step: linear warm-up, then exponential/cosine decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.max_steps - config.warmup_steps, 1)
    progress = min(progress, 1.0)
    if config.lr_schedule == 'exponential':
        return config.lr_final_ratio ** progress
    if config.lr_schedule == 'cosine':
        final = config.lr_final_ratio
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def affine_fit(estimate, target, valid):
    """
    Return ``estimate`` mapped by the per-sample scale and shift that fit it to ``target``.

    Least squares over the valid pixels, differentiable (the loss of an affine-invariant
    estimate); a flat estimate gets scale 0 and the target's mean.

    :param estimate: [B, 1, H, W]; :param target: same shape; :param valid: same shape, bool
    """
    weight = valid.to(estimate.dtype)
    count = weight.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1)
    mean_e = (estimate * weight).sum(dim=(1, 2, 3), keepdim=True) / count
    mean_t = (target * weight).sum(dim=(1, 2, 3), keepdim=True) / count
    centred = (estimate - mean_e) * weight
    variance = centred.square().sum(dim=(1, 2, 3), keepdim=True)
    scale = (centred * (target - mean_t)).sum(dim=(1, 2, 3), keepdim=True) / (variance + 1e-12)
    return scale * (estimate - mean_e) + mean_t


def _abs_rel(estimate, truth):
    """Score an affine-invariant estimate against depth (NaN = invalid): AbsRel, or None."""
    try:
        return score_image(estimate, truth, np.isfinite(truth), 1e-3, math.inf)['abs_rel']
    except AlignmentError:
        return None


def find_checkpoint(output_dir, checkpoint='latest'):
    """
    Folder of a training checkpoint: a given one, or the latest of a run.

    :param checkpoint: folder path or 'latest'
    :raises TrainingError: no such checkpoint
    """
    folder = Path(output_dir) / 'checkpoints'
    if checkpoint == 'latest':
        found = sorted(folder.glob('step_*'))
        if not found:
            raise TrainingError(f'no checkpoint to resume from in {folder}')
        checkpoint = found[-1]
    checkpoint = Path(checkpoint)
    if not (checkpoint / 'trainer_state.json').is_file():
        raise TrainingError(f'{checkpoint} is not a training checkpoint')
    return checkpoint


def make_accelerator(config):
    """
    Make the run's Accelerator: one process, or every process a launcher started.

    Launched as several processes (``WORLD_SIZE`` > 1, e.g. ``accelerate launch --multi_gpu``
    or ``torchrun``) on a machine without GPUs, accelerate would give each process a
    one-process run of its own; they are joined on the CPU (gloo) instead.

    :raises TrainingError: the launcher's processes did not join one run
    """
    from accelerate import Accelerator
    world = int(os.environ.get('WORLD_SIZE') or 1)
    cpu = world > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
    if world > 1 and accelerator.num_processes != world:
        raise TrainingError(f'launched as {world} processes, but accelerate joined '
                            f'{accelerator.num_processes}: check the launcher settings')
    return accelerator


def check_batch_layout(state, config, processes, checkpoint):
    """
    Refuse to resume where the data stream would not go on as in the interrupted run.

    Draw numbers, noise and the loss depend on the samples per micro-step over all processes
    (processes x batch_size) and on grad_accumulation, not on how they are split: 2 processes
    of batch 8 continue a run of 1 process of batch 16 exactly (up to summation order), while
    any other change would silently move the draw numbering.

    :param state: the checkpoint's trainer_state.json (older ones lack the layout: accepted)
    :raises TrainingError: naming the checkpoint's and this run's values
    """
    if 'processes' not in state:
        return
    then = (state['processes'], state['batch_size'], state['grad_accumulation'])
    now = (processes, config.batch_size, config.grad_accumulation)
    if then[0] * then[1] == now[0] * now[1] and then[2] == now[2]:
        return

    def layout(values):
        count, batch, accumulation = values
        return (f'{_processes(count)} x batch_size {batch} = {count * batch} samples per '
                f'micro-step, grad_accumulation {accumulation}')
    micro = then[0] * then[1]
    fix = (f'batch_size={micro // now[0]} on {_processes(now[0])}' if micro % now[0] == 0
           else f'processes x batch_size = {micro}')
    raise TrainingError(
        f'cannot resume {checkpoint}: it was trained with {layout(then)}; this run has '
        f'{layout(now)}. That would move the data stream and change the loss: resume with '
        f'{fix} and grad_accumulation={then[2]}, or start a new run (another output_dir)')


def _processes(count):
    return f'{count} process' + ('es' if count != 1 else '')


# ---- the run ---------------------------------------------------------------------------------


class Trainer:
    """One training run: set-up, steps, checkpoints, logging and export."""

    def __init__(self, config, dataset=None):
        """
        Load the data and the base model, prepare accelerate.

        :param dataset: optional dataset yielding Sample objects at the training resolution
            (tests, recipes); anything but a MixedDataset is drawn from as its only source
        """
        from ..data.mixing import MixedDataset
        self.config = config
        self.output = Path(config.output_dir)
        base_path = resolve_model_path(config.base_model)  # cheap checks first: model, data
        if dataset is None:
            dataset = build_training_data(config)
        elif not isinstance(dataset, MixedDataset):
            dataset = MixedDataset([dataset], [1.0], seed=config.seed)
        self.dataset = dataset
        self.accelerator = make_accelerator(config)
        unet, vae, scheduler_config, embedding, base_index = load_base(str(base_path))
        self.base_index = base_index
        self.scheduler = training_scheduler(scheduler_config)
        device = self.accelerator.device
        weight_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(
            config.mixed_precision, torch.float32)
        self.vae = vae.to(device, weight_dtype).eval().requires_grad_(False)
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.embedding = embedding.to(device, weight_dtype)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if config.channels_last:
            unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        unet.train()
        optimizer_class = torch.optim.AdamW if config.optimizer == 'adamw' else torch.optim.Adam
        # fused: one kernel for all parameters (CPU and CUDA); 5-10 % of a tiny-model step.
        optimizer = optimizer_class(unet.parameters(), lr=config.lr,
                                    weight_decay=config.weight_decay, fused=True)
        # The learning rate is set from self.step before every optimiser step (set_lr), not by
        # an accelerate-prepared scheduler: that one steps once per process per optimiser step
        # and not at all on skipped fp16 steps, so it drifts from the step count.
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.ema = (ExponentialAverage(self.unet.parameters(), config.ema_decay)
                    if config.ema_decay > 0 else None)
        self.alphas = self.scheduler.alphas_cumprod.to(device)
        self.latent_cache = {} if config.cache_latents else None
        self.val_rows = None  # latents of the validation draws, encoded at the first use
        self.val_truth = None  # their depth (NaN = invalid), as numpy images
        self.step = 0
        self.losses = []
        self.val_losses = []  # (step, validation loss)
        self.val_abs_rels = []  # (step, validation AbsRel of the one-step estimate)
        self.no_depth = 0  # drawn samples without any valid depth pixel (taught nothing)
        self.skipped = 0  # unreadable samples replaced, all processes
        self._skipped_seen = self._dataset_skipped()  # this process's count already summed
        self.last_lr = self.set_lr()

    # -- learning rate ----------------------------------------------------------------------

    def lr_at(self, step):
        """Return the learning rate of an optimiser step (0 for the first)."""
        return self.config.lr * lr_factor(step, self.config)

    def set_lr(self):
        """Set the optimiser's learning rate for the coming step, ``self.step``."""
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        return lr

    # -- one step ---------------------------------------------------------------------------

    def _encode(self, images):
        return self.vae.encode(images).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def _encode_samples(self, samples):
        """Latent rows (rgb, depth, valid, no-depth flag) of samples, encoded in one batch."""
        device, dtype = self.accelerator.device, self.vae.dtype
        rgb, depth, valid = (torch.stack(part) for part in zip(
            *[sample_to_tensors(sample, self.config) for sample in samples]))
        rgb_latent = self._encode(rgb.to(device, dtype))
        depth_latent = self._encode(depth.to(device, dtype).repeat(1, 3, 1, 1))
        # A latent pixel teaches the model only if every image pixel under it is valid.
        valid_latent = ~F.max_pool2d((~valid.to(device)).float(), self.latent_factor).bool()
        valid_latent = valid_latent.expand_as(depth_latent)
        empty = ~valid.flatten(1).any(1)
        parts = [rgb_latent, depth_latent, valid_latent, empty]
        if self.config.affine_depth_steps:  # the end-to-end loss scores the depth image itself
            parts += [depth.to(device), valid.to(device)]
        return [tuple(part[row] for part in parts) for row in range(len(samples))]

    @torch.no_grad()
    def encode_samples(self, numbers):
        """
        Latents of draws of the data stream: RGB latent, depth latent, latent validity.

        With ``cache_latents``, a draw whose (frame, crop, flip) was encoded before is served
        from the cache; nothing else is cached.

        :param numbers: draw numbers (see :func:`draw_numbers`)
        :return: ([B, C, h, w], [B, C, h, w], [B, C, h, w] bool, [B] bool no valid depth),
            then with ``affine_depth_steps`` the depth images and their validity
            ([B, 1, H, W] in [-1, 1], [B, 1, H, W] bool)
        """
        cache = self.latent_cache
        keys = [self.dataset.cache_key(n) if cache is not None else None for n in numbers]
        rows = [cache.get(key) if key is not None else None for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            samples = [self.dataset.sample(numbers[i]) for i in missing]
            for i, row in zip(missing, self._encode_samples(samples)):
                rows[i] = row
                if cache is not None:
                    key = self.dataset.cache_key(numbers[i])  # known now the frame was read
                    if key is not None:
                        cache[key] = row
        return tuple(torch.stack(part) for part in zip(*rows))

    def prefill_latent_cache(self, batch=64):
        """Encode every frame's variants (both flips of frames at the training size), batched."""
        if self.latent_cache is None:
            return
        pending = []

        def flush():
            rows = self._encode_samples([sample for _, sample in pending])
            self.latent_cache.update((key, row) for (key, _), row in zip(pending, rows))
            pending.clear()

        for key, sample in self.dataset.variants():
            if key not in self.latent_cache:
                pending.append((key, sample))
            if len(pending) >= batch:
                flush()
        if pending:
            flush()

    def sample_generators(self, numbers, stream=_NOISE_STREAM):
        """Return one CPU noise generator per draw, seeded by (seed, draw number) alone."""
        # A draw's timestep and noise then do not depend on how a global batch is split into
        # processes and micro-batches: two processes of batch B draw what one of batch 2B does.
        return [torch.Generator('cpu').manual_seed(
            int(np.random.default_rng([self.config.seed, stream, number])
                .integers(2 ** 62))) for number in numbers]

    def compute_loss(self, rgb_latent, depth_latent, valid_latent, generators):
        """
        Marigold's loss terms for one micro-batch: squared velocity errors on valid pixels.

        Each sample takes its timestep and its noise from its own generator; pyramid noise is
        Marigold's draw for a batch of one (normalised per sample, not per batch).

        :param rgb_latent: [B, C, h, w] scaled image latents
        :param depth_latent: [B, C, h, w] scaled latents of the normalised depth
        :param valid_latent: [B, C, h, w] bool, latent pixels with fully valid depth
        :param generators: one torch.Generator per sample (:meth:`sample_generators`)
        :return: (sum of squared errors over the valid latent pixels, scalar tensor with
            gradient; number of those pixels, int)
        """
        config = self.config
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=generator)
                               for generator in generators])
        if config.final_timestep_share > 0:
            final = torch.cat([torch.rand(1, generator=generator) for generator in generators])
            timesteps[final < config.final_timestep_share] = steps - 1
        alpha, noisy, noise, prediction = self._predict_velocity(
            rgb_latent, depth_latent, timesteps, generators)
        target = alpha.sqrt() * noise - (1 - alpha).sqrt() * depth_latent  # velocity
        count = int(valid_latent.sum())
        if not count:
            return (prediction * 0).sum(), 0  # nothing valid: no gradient, keeps DDP in step
        error = prediction.float()[valid_latent] - target.float()[valid_latent]
        return error.square().sum(), count

    def compute_affine_depth_loss(self, rgb_latent, depth, valid, generators):
        """
        End-to-end loss of the one-step estimate: affine-invariant L1 of the decoded depth.

        The U-Net runs at the last timestep on each sample's noise, as a one-step estimate
        does; its clean latent goes through the frozen VAE decoder (gradients flow through it
        to the U-Net), is fitted to the depth by least-squares scale and shift per sample,
        and the absolute errors of the fit on valid pixels are summed.

        :param depth: [B, 1, H, W] normalised depth in [-1, 1]
        :param valid: [B, 1, H, W] bool, valid depth pixels
        :return: (sum of absolute errors, scalar tensor with gradient; valid pixel count)
        """
        estimate = self.one_step_estimate(rgb_latent, generators)
        count = int(valid.sum())
        if not count:
            return (estimate * 0).sum(), 0
        aligned = affine_fit(estimate, depth, valid)
        return (aligned - depth).abs()[valid].sum(), count

    def one_step_estimate(self, rgb_latent, generators):
        """
        Estimate in one step: the U-Net at the last timestep, its clean latent decoded.

        :return: [B, 1, H, W] float32 depth in the normalised range (-1 near, 1 far)
        """
        last = self.scheduler.config.num_train_timesteps - 1
        timesteps = torch.full((rgb_latent.shape[0],), last, dtype=torch.long)
        # The depth latent has the image latent's shape; at the last timestep it is all noise.
        _, noisy, _, prediction = self._predict_velocity(
            rgb_latent, torch.zeros_like(rgb_latent), timesteps, generators)
        clean, _ = original_and_noise(self.scheduler, prediction, last, noisy)
        decoded = self.vae.decode(clean / self.vae.config.scaling_factor,
                                  return_dict=False)[0]
        return decoded.float().mean(dim=1, keepdim=True)

    def _predict_velocity(self, rgb_latent, depth_latent, timesteps, generators):
        """Noise the depth latents at ``timesteps`` and run the U-Net on them."""
        config = self.config
        device = self.accelerator.device
        batch = rgb_latent.shape[0]
        steps = self.scheduler.config.num_train_timesteps
        if config.pyramid_noise:
            strength = torch.full((batch,), float(config.pyramid_strength))
            if config.pyramid_anneal:
                strength = annealed_strength(config.pyramid_strength, timesteps, steps)
            noise = torch.cat([
                pyramid_noise_like(depth_latent[row:row + 1].cpu().float(), strength[row],
                                   generator=generator)
                for row, generator in enumerate(generators)])
        else:
            noise = torch.cat([torch.randn((1, *depth_latent.shape[1:]), generator=generator)
                               for generator in generators])
        timesteps = timesteps.to(device)
        noise = noise.to(device, depth_latent.dtype)
        alpha = self.alphas[timesteps].view(-1, 1, 1, 1).to(depth_latent.dtype)
        noisy = alpha.sqrt() * depth_latent + (1 - alpha).sqrt() * noise
        text = self.embedding.repeat(batch, 1, 1)
        with self.accelerator.autocast():
            prediction = self.unet(torch.cat([rgb_latent, noisy], dim=1), timesteps,
                                   encoder_hidden_states=text, return_dict=False)[0]
        return alpha, noisy, noise, prediction

    def trains_affine_depth(self):
        """Tell whether the coming step trains end to end (the last affine_depth_steps)."""
        return self.step >= self.config.max_steps - self.config.affine_depth_steps

    def train_step(self):
        """
        One optimiser step over ``grad_accumulation`` micro-batches on every process.

        The loss of a micro-step is the masked MSE over the valid pixels of the global
        micro-batch (all processes together): each process sums its squared errors and
        divides by the pixel count summed over processes, so the averaged gradients are those
        of one process drawing the whole batch. Counts of no-depth and unreadable samples are
        summed over processes too.

        :return: the step's loss (mean over micro-steps of the global micro-batch loss)
        """
        config = self.config
        process = self.accelerator.process_index
        processes = self.accelerator.num_processes
        self.last_lr = self.set_lr()
        total = 0.0
        for micro in range(config.grad_accumulation):
            numbers = draw_numbers(config, self.step, micro, process, processes)
            rgb_latent, depth_latent, valid_latent, empty, *images = self.encode_samples(numbers)
            generators = self.sample_generators(numbers)
            last = micro == config.grad_accumulation - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.unet)
            with sync:
                if self.trains_affine_depth():
                    error, count = self.compute_affine_depth_loss(rgb_latent, *images,
                                                                  generators)
                else:
                    error, count = self.compute_loss(rgb_latent, depth_latent, valid_latent,
                                                     generators)
                skipped = self._dataset_skipped()
                sums = self._sum_over_processes(
                    [error.item(), count, int(empty.sum()), skipped - self._skipped_seen])
                self._skipped_seen = skipped
                self.skipped += int(sums[3])
                self._count_no_depth(int(sums[2]))
                loss = sums[0] / sums[1] if sums[1] else 0.0
                if not math.isfinite(loss):  # the same global value on every process
                    raise TrainingError(
                        f'loss became {loss} at step {self.step}; the run is stopped. '
                        f'The last good checkpoint is kept in {self.output / "checkpoints"}: '
                        'lower lr, or check the data (depth ranges, invalid masks)')
                # DDP averages gradients over processes: scale each share back up.
                scale = processes / (max(sums[1], 1) * config.grad_accumulation)
                self.accelerator.backward(error * scale)
            total += loss
        if config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.unet.parameters(), config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unet.parameters())
        self.step += 1
        return total / config.grad_accumulation

    # -- validation ---------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, batch=64):
        """
        Score the held-out draws of ``val_data`` with the weights that are exported.

        Every call scores the same draws with the same timesteps and noise (their own seed
        streams), so values from different steps compare. Every process computes it whole.

        :return: (mean squared velocity error over the valid latent pixels, mean AbsRel of
            the one-step estimate after per-image least-squares scale and shift, the
            evaluation protocol), or None without val_data
        """
        config = self.config
        if not config.val_data:
            return None
        if self.val_rows is None:
            dataset = build_validation_data(config)
            samples = [dataset.sample(number) for number in range(config.val_samples)]
            self.val_rows = [row for start in range(0, len(samples), batch)
                             for row in self._encode_samples(samples[start:start + batch])]
            self.val_truth = [np.where(sample.valid, sample.depth, np.nan).astype(np.float32)
                              for sample in samples]
        exported = (self.ema.applied_to(self.unet.parameters()) if self.ema is not None
                    else contextlib.nullcontext())
        total, count, abs_rels = 0.0, 0, []
        self.unet.eval()
        try:
            with exported:
                for start in range(0, len(self.val_rows), batch):
                    rows = self.val_rows[start:start + batch]
                    numbers = range(start, start + len(rows))
                    rgb_latent, depth_latent, valid_latent = (
                        torch.stack(part) for part in list(zip(*rows))[:3])
                    error, pixels = self.compute_loss(
                        rgb_latent, depth_latent, valid_latent,
                        self.sample_generators(numbers, _VAL_NOISE_STREAM))
                    total, count = total + error.item(), count + pixels
                    estimates = self.one_step_estimate(
                        rgb_latent, self.sample_generators(numbers, _VAL_ESTIMATE_STREAM))
                    abs_rels += [_abs_rel(estimate[0], self.val_truth[number])
                                 for estimate, number in zip(estimates.cpu().numpy(), numbers)]
        finally:
            self.unet.train()
        scored = [value for value in abs_rels if value is not None]
        return (total / count if count else math.nan,
                float(np.mean(scored)) if scored else math.nan)

    def _sum_over_processes(self, values):
        """Return float64 sums of numbers over all processes, on every process (exact counts)."""
        if self.accelerator.num_processes == 1:
            return [float(value) for value in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, 'sum').tolist()

    def _dataset_skipped(self):
        """Unreadable samples this process's dataset replaced so far."""
        return int(getattr(self.dataset, 'skipped', 0))

    def _count_no_depth(self, count):
        if count and not self.no_depth and self.accelerator.is_main_process:
            print(f'marigold-train: step {self.step} drew a sample without any valid depth; '
                  'such samples are masked out of the loss and counted (no_depth in log.csv)',
                  file=sys.stderr)
        self.no_depth += count

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint_dir(self):
        """Folder holding the checkpoints of this run."""
        return self.output / 'checkpoints'

    def save_checkpoint(self):
        """Write the full state atomically (written aside, then renamed); return its Path."""
        folder = self.checkpoint_dir()
        final = folder / f'step_{self.step:07d}'
        partial = folder / f'.partial_step_{self.step:07d}'
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        if self.accelerator.is_main_process:
            state = {'step': self.step, 'lr': self.lr_at(self.step), 'skipped': self.skipped,
                     'no_depth': self.no_depth, 'losses': self.losses,
                     'val_losses': self.val_losses, 'val_abs_rels': self.val_abs_rels,
                     'processes': self.accelerator.num_processes,
                     'batch_size': self.config.batch_size,
                     'grad_accumulation': self.config.grad_accumulation}
            (partial / 'trainer_state.json').write_text(json.dumps(state))
            if self.ema is not None:
                torch.save(self.ema.shadow, partial / 'ema.pt')
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            kept = sorted(folder.glob('step_*'))
            for old in kept[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self, checkpoint='latest', training=True):
        """
        Restore the full state from a checkpoint folder (or the latest one of the run).

        :param checkpoint: folder path or 'latest'
        :param training: the run goes on (not only an export): refuse a checkpoint whose
            batch layout would not continue its data stream (see :func:`check_batch_layout`)
        :return: Path restored from
        :raises TrainingError: no checkpoint, or a batch layout that cannot go on
        """
        checkpoint = find_checkpoint(self.output, checkpoint)
        state = json.loads((checkpoint / 'trainer_state.json').read_text())
        if training:
            check_batch_layout(state, self.config, self.accelerator.num_processes, checkpoint)
        self.accelerator.load_state(str(checkpoint))
        self.step = state['step']
        self.losses = state.get('losses', [])
        self.val_losses = [tuple(pair) for pair in state.get('val_losses', [])]
        self.val_abs_rels = [tuple(pair) for pair in state.get('val_abs_rels', [])]
        self.no_depth = int(state.get('no_depth', 0))
        self.skipped = int(state.get('skipped', 0))
        self._skipped_seen = self._dataset_skipped()
        if self.ema is not None:
            self.ema.shadow = torch.load(checkpoint / 'ema.pt')
        self.last_lr = self.lr_at(max(self.step - 1, 0))
        self.set_lr()
        return checkpoint

    def _skipped(self):
        return self.skipped

    # -- export -----------------------------------------------------------------------------

    def export(self, path=None):
        """
        Save the trained model in diffusers format (EMA weights when enabled).

        The live model is not touched (the export works on copies) and the folder appears
        complete or not at all (written aside, then renamed into place).

        :param path: output folder, default <output_dir>/model
        """
        from diffusers import UNet2DConditionModel
        path = Path(path or self.output / 'model')
        unet = self.accelerator.unwrap_model(self.unet)
        if self.ema is not None:
            unet = UNet2DConditionModel.from_config(unet.config)
            self.ema.copy_to(unet.parameters())
        config = self.config
        save_marigold(path, unet, self.vae, self.embedding, config.export_steps,
                      config.export_resolution, fp16=config.export_fp16,
                      extra={'training': config_to_dict(config), 'steps_trained': self.step},
                      scheduler_config=export_scheduler_config(self.scheduler))
        return path

    # -- the loop ---------------------------------------------------------------------------

    def run(self):
        """Train to max_steps with logging and checkpoints, export, and return the model's Path."""
        config = self.config
        self.output.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            with open(self.output / 'config.yaml', 'w') as stream:
                yaml.safe_dump(config_to_dict(config), stream, sort_keys=False)
        log = RunLog(self.output, config.logger, self.accelerator.is_main_process,
                     start=self.step)
        progress = _progress(config, self.step, self.accelerator.is_main_process)
        samples = config.batch_size * config.grad_accumulation * self.accelerator.num_processes
        if (self.latent_cache is not None and config.prefill_cache and not self.latent_cache
                and self.step < config.max_steps):  # a finished run resumed only exports
            self.prefill_latent_cache()
        clock = time.perf_counter()
        logged = self.step
        while self.step < config.max_steps:
            loss = self.train_step()
            self.losses.append(loss)
            progress.update(1)
            progress.set_postfix(loss=f'{loss:.4f}')
            last = self.step == config.max_steps
            scores = None
            if config.val_data and (self.step % config.val_every == 0 or last):
                started = time.perf_counter()
                scores = self.validate()
                self.val_losses.append((self.step, scores[0]))
                self.val_abs_rels.append((self.step, scores[1]))
                clock += time.perf_counter() - started  # samples/s counts training alone
            if self.step % config.log_every == 0 or last or scores is not None:
                elapsed = time.perf_counter() - clock
                log.write(self.step, loss, self.last_lr,
                          samples * (self.step - logged) / max(elapsed, 1e-9), self._skipped(),
                          self.no_depth, *(scores or ()))
                clock, logged = time.perf_counter(), self.step
            if self.step % config.checkpoint_every == 0 or self.step == config.max_steps:
                self.save_checkpoint()
        progress.close()
        log.close()
        if not self.accelerator.is_main_process:
            return None
        if self.skipped:
            print(f'{self.skipped} unreadable samples were skipped', file=sys.stderr)
        if self.no_depth:
            print(f'{self.no_depth} drawn samples had no valid depth and taught nothing',
                  file=sys.stderr)
        return self.export()


def _progress(config, start, active):
    from tqdm import tqdm
    return tqdm(total=config.max_steps, initial=start, disable=not (active and config.progress),
                desc='training', unit='step', dynamic_ncols=True)


def main(argv=None):
    """Run ``marigold-train CONFIG [key=value ...] [--resume [CHECKPOINT]]``; return exit code."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='YAML training config')
    parser.add_argument('overrides', nargs='*', help='key=value settings over the config')
    parser.add_argument('--resume', nargs='?', const='latest', default=None,
                        help="resume from a checkpoint folder, or the run's latest")
    parser.add_argument('--export-only', action='store_true',
                        help='export the model of a checkpoint (--resume, default the latest '
                             'of the run) and stop')
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        resume = args.resume or ('latest' if args.export_only else None)
        if resume:
            resume = find_checkpoint(config.output_dir, resume)  # before loading any model
        trainer = Trainer(config)
        if resume:
            trainer.resume(resume, training=not args.export_only)
        if args.export_only:
            print(f'exporting {resume} (step {trainer.step})')
            path = trainer.export()
        else:
            path = trainer.run()
    except (TrainingError, OSError, ValueError) as error:
        print(f'marigold-train: {error}', file=sys.stderr)
        return 2
    if path is not None:
        print(f'model written to {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
