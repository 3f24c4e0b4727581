"""
Fine-tune Marigold on synthetic RGB-D data (the paper's recipe), on one CPU or many GPUs.

Usage::

    marigold-train CONFIG.yaml [key=value ...]
    accelerate launch -m marigold_model.trainer CONFIG.yaml [key=value ...]

The U-Net learns v-prediction on DDPM (1000 steps) with annealed multi-resolution noise; the
VAE is frozen and the empty-prompt embedding is computed once. Every step draws its samples,
timesteps and noise from generators seeded by (seed, step, micro-step, process), so a resumed
run repeats an uninterrupted one exactly; the checkpoint still holds the full state (U-Net,
optimiser, schedule, step, RNG states, EMA, skipped-sample count).
"""

import contextlib
import csv
from dataclasses import asdict, dataclass, field, fields
import json
import math
from pathlib import Path
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .alignment import normalize_percentile
from .architecture import save_marigold
from .loading import _load_empty_text_embedding, read_pipeline_config, resolve_model_path
from .noise import annealed_strength, pyramid_noise_like


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


@dataclass(frozen=True)
class DataSpec:
    """
    One training data source.

    :param kind: 'synthetic', 'hypersim', 'vkitti', 'folder' or 'bag'
    :param root: folder or file to read ('' for synthetic)
    :param probability: share of samples drawn from this source
    :param options: reader-specific keyword arguments
    """

    kind: str = 'synthetic'
    root: str = ''
    probability: float = 1.0
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting, with the paper's values as defaults where they apply."""

    output_dir: str = 'runs/marigold'
    # A Marigold checkpoint, or a Stable Diffusion 2 one (its 4-channel U-Net input is widened).
    base_model: str = 'prs-eth/marigold-depth-v1-1'
    data: tuple = (DataSpec(),)
    height: int = 480
    width: int = 640
    hflip: bool = True
    max_steps: int = 30000
    batch_size: int = 2
    grad_accumulation: int = 16
    lr: float = 3e-5
    optimizer: str = 'adam'
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = 'exponential'
    lr_final_ratio: float = 0.01
    max_grad_norm: float = 1.0
    mixed_precision: str = 'no'
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0
    pyramid_noise: bool = True
    pyramid_strength: float = 0.9
    pyramid_anneal: bool = True
    depth_low_percentile: float = 0.02
    depth_high_percentile: float = 0.98
    seed: int = 0
    log_every: int = 10
    logger: str = 'csv'
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    export_fp16: bool = False
    progress: bool = True
    # Keep the VAE latents of each dataset index after first use. Only for datasets that give
    # the same sample for an index every time (all readers here do); saves two VAE encodes
    # per sample per step, which dominate small-model training on a CPU.
    cache_latents: bool = False
    # With cache_latents, encode the whole dataset before the first step (in order, batched):
    # for small datasets this is cheaper than discovering indices step by step.
    prefill_cache: bool = False
    # Exported model defaults (for users of the resulting model).
    export_steps: int = 1
    export_resolution: int = 768


def load_config(path=None, overrides=()):
    """
    Read a YAML config and apply ``key=value`` overrides (values parsed as YAML).

    :param path: YAML file or None for the defaults
    :param overrides: iterable of 'key=value' strings
    :return: TrainConfig
    """
    values = {}
    if path is not None:
        if not Path(path).is_file():
            raise TrainingError(f'config file {path} does not exist')
        with open(path) as stream:
            values = yaml.safe_load(stream) or {}
    for item in overrides:
        if '=' not in item:
            raise TrainingError(f'override {item!r} is not key=value')
        key, value = item.split('=', 1)
        values[key] = yaml.safe_load(value)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise TrainingError(f'unknown training settings: {sorted(unknown)}')
    if 'data' in values:
        values['data'] = tuple(DataSpec(**spec) for spec in values['data'])
    config = TrainConfig(**values)
    validate_config(config)
    return config


def validate_config(config):
    """
    Reject settings that cannot work, before anything is loaded.

    :param config: TrainConfig
    """
    if config.height % 8 or config.width % 8:
        raise TrainingError('height and width must be multiples of 8')
    if min(config.batch_size, config.grad_accumulation, config.max_steps) < 1:
        raise TrainingError('batch_size, grad_accumulation and max_steps must be >= 1')
    if config.lr_schedule not in ('exponential', 'cosine', 'constant'):
        raise TrainingError(f'unknown lr_schedule {config.lr_schedule!r}')
    if config.optimizer not in ('adam', 'adamw'):
        raise TrainingError(f'unknown optimizer {config.optimizer!r}')
    if config.logger not in ('csv', 'tensorboard'):
        raise TrainingError(f'unknown logger {config.logger!r}')
    if not config.data or sum(spec.probability for spec in config.data) <= 0:
        raise TrainingError('data needs at least one source with a positive probability')


def config_to_dict(config):
    """
    Plain dict of a TrainConfig, for saving next to a run.

    :param config: TrainConfig
    :return: dict
    """
    values = asdict(config)
    values['data'] = [asdict(spec) for spec in config.data]
    return values


def lr_factor(step, config):
    """
    Learning-rate multiplier: linear warm-up, then exponential (or cosine) decay.

    :param step: optimiser step
    :param config: TrainConfig
    :return: factor applied to config.lr
    """
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


# ---- data ------------------------------------------------------------------------------------


def build_source(spec, config):
    """
    Make the dataset of one DataSpec.

    :param spec: DataSpec
    :param config: TrainConfig (for the resolution of synthetic scenes)
    :return: a Dataset yielding Sample objects
    """
    options = dict(spec.options)
    if spec.kind == 'synthetic':
        from .data.synthetic import SceneConfig, SyntheticDataset
        scene = SceneConfig(height=config.height, width=config.width,
                            **options.pop('scene', {}))
        return SyntheticDataset(config=scene, **options)
    if spec.kind == 'hypersim':
        from .data.hypersim import HypersimDataset
        return HypersimDataset(spec.root, **options)
    if spec.kind == 'vkitti':
        from .data.vkitti import VirtualKitti2Dataset
        return VirtualKitti2Dataset(spec.root, **options)
    if spec.kind == 'folder':
        from .data.rgbd_folder import RGBDFolderDataset
        return RGBDFolderDataset(spec.root, **options)
    if spec.kind == 'bag':
        from .data.bag_rgbd import BagRGBDDataset
        return BagRGBDDataset(spec.root, **options)
    raise TrainingError(f'unknown data kind {spec.kind!r}')


def build_training_data(config):
    """
    Build the mixed training set: sources drawn by probability, resized, flipped.

    :param config: TrainConfig
    :return: MixedDataset
    """
    from .data.mixing import MixedDataset, TrainTransform
    sources = [build_source(spec, config) for spec in config.data]
    probabilities = [spec.probability for spec in config.data]
    transform = TrainTransform(config.height, config.width, hflip=config.hflip)
    return MixedDataset(sources, probabilities, length=max(len(s) for s in sources),
                        seed=config.seed, transform=transform)


def sample_to_tensors(sample, config):
    """
    Turn one Sample into model inputs: RGB and normalised depth in [-1, 1], valid mask.

    :param sample: Sample at the training resolution
    :param config: TrainConfig
    :return: (rgb [3, H, W], depth [1, H, W], valid [1, H, W]) tensors
    """
    rgb = torch.from_numpy(sample.rgb.transpose(2, 0, 1).copy()).float() / 127.5 - 1.0
    depth = normalize_percentile(sample.depth, sample.valid, config.depth_low_percentile,
                                 config.depth_high_percentile)
    depth = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]
    valid = torch.from_numpy(np.ascontiguousarray(sample.valid))[None]
    return rgb, depth, valid


def batch_indices(dataset, config, step, micro, process):
    """
    Dataset indices of a given (step, micro-step, process): the same every time asked.

    :param dataset: the training dataset
    :param config: TrainConfig
    :param step: optimiser step
    :param micro: micro-step within gradient accumulation
    :param process: process index (multi-GPU shards draw different samples)
    :return: list of int indices
    """
    rng = np.random.default_rng([config.seed, step, micro, process])
    return [int(i) for i in rng.integers(0, len(dataset), size=config.batch_size)]


# ---- model -----------------------------------------------------------------------------------


def widen_unet_input(unet):
    """
    Widen a 4-channel U-Net input conv to 8 channels (RGB latent + depth latent).

    The weights are copied for both halves and halved, so at the start the U-Net responds to
    the pair as Stable Diffusion did to one latent (the paper's initialisation).

    :param unet: UNet2DConditionModel with 4 input channels
    :return: the same U-Net, now with 8
    """
    old = unet.conv_in
    new = torch.nn.Conv2d(old.in_channels * 2, old.out_channels, old.kernel_size,
                          old.stride, old.padding)
    with torch.no_grad():
        new.weight.copy_(torch.cat([old.weight, old.weight], dim=1) / 2)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels * 2)
    return unet


def load_base(model):
    """
    Load U-Net, VAE, scheduler config and empty-text embedding of the starting model.

    :param model: Marigold or Stable Diffusion 2 name / folder
    :return: (unet, vae, scheduler_config dict, embedding, pipeline_config)
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    path = resolve_model_path(model)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder='unet', local_files_only=True)
    if unet.config.in_channels == unet.config.out_channels:
        widen_unet_input(unet)
    elif unet.config.in_channels != 2 * unet.config.out_channels:
        raise TrainingError(f'{path}: U-Net input of {unet.config.in_channels} channels is '
                            'neither Stable Diffusion (4) nor Marigold (8)')
    vae = AutoencoderKL.from_pretrained(path, subfolder='vae', local_files_only=True)
    with open(path / 'scheduler' / 'scheduler_config.json') as stream:
        scheduler_config = json.load(stream)
    embedding = _load_empty_text_embedding(path, 'cpu', torch.float32)
    return unet, vae, scheduler_config, embedding, read_pipeline_config(path)


def training_scheduler(scheduler_config):
    """
    DDPM with 1000 steps and v-prediction, keeping the base model's beta schedule.

    :param scheduler_config: the base model's scheduler_config.json entries
    :return: DDPMScheduler
    """
    from diffusers import DDPMScheduler
    keep = ('num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule',
            'rescale_betas_zero_snr')
    values = {k: scheduler_config[k] for k in keep if k in scheduler_config}
    return DDPMScheduler(prediction_type='v_prediction', clip_sample=False, **values)


class ExponentialAverage:
    """EMA of the trainable parameters, used for export when enabled."""

    def __init__(self, parameters, decay):
        """
        Start the average at the current parameters.

        :param parameters: iterable of tensors
        :param decay: EMA decay per optimiser step
        """
        self.decay = decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters):
        """
        Move the average towards the current parameters.

        :param parameters: the same iterable of tensors
        """
        for shadow, param in zip(self.shadow, parameters):
            shadow.lerp_(param.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, parameters):
        """
        Write the average into parameters.

        :param parameters: the same iterable of tensors
        """
        for shadow, param in zip(self.shadow, parameters):
            param.copy_(shadow)


# ---- the run ---------------------------------------------------------------------------------


class Trainer:
    """One training run: set-up, steps, checkpoints, logging and export."""

    def __init__(self, config, dataset=None):
        """
        Load the base model and data, prepare accelerate.

        :param config: TrainConfig
        :param dataset: optional dataset yielding Sample objects (tests, recipes)
        """
        from accelerate import Accelerator
        validate_config(config)
        self.config = config
        self.output = Path(config.output_dir)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision)
        unet, vae, scheduler_config, embedding, base_index = load_base(config.base_model)
        self.base_index = base_index
        self.scheduler = training_scheduler(scheduler_config)
        self.dataset = dataset if dataset is not None else build_training_data(config)
        device = self.accelerator.device
        weight_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(
            config.mixed_precision, torch.float32)
        self.vae = vae.to(device, weight_dtype).eval().requires_grad_(False)
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.embedding = embedding.to(device, weight_dtype)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        optimizer_class = torch.optim.AdamW if config.optimizer == 'adamw' else torch.optim.Adam
        optimizer = optimizer_class(unet.parameters(), lr=config.lr,
                                    weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                     lambda step: lr_factor(step, config))
        self.unet, self.optimizer, self.lr_schedule = self.accelerator.prepare(
            unet, optimizer, schedule)
        self.ema = (ExponentialAverage(self.unet.parameters(), config.ema_decay)
                    if config.ema_decay > 0 else None)
        self.alphas = self.scheduler.alphas_cumprod.to(device)
        self.latent_cache = {} if config.cache_latents else None
        self.step = 0
        self.losses = []

    # -- one step ---------------------------------------------------------------------------

    def _encode(self, images):
        return self.vae.encode(images).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_samples(self, indices):
        """
        Latents of dataset samples: RGB latent, depth latent and latent validity.

        :param indices: dataset indices
        :return: ([B, C, h, w], [B, C, h, w], [B, C, h, w] bool) tensors on the device
        """
        device, dtype = self.accelerator.device, self.vae.dtype
        cache = self.latent_cache
        missing = [i for i in dict.fromkeys(indices) if cache is None or i not in cache]
        fresh = {}
        if missing:
            rgb, depth, valid = (torch.stack(part) for part in zip(
                *[sample_to_tensors(self.dataset[i], self.config) for i in missing]))
            rgb_latent = self._encode(rgb.to(device, dtype))
            depth_latent = self._encode(depth.to(device, dtype).repeat(1, 3, 1, 1))
            # A latent pixel teaches the model only if every image pixel under it is valid.
            valid_latent = ~F.max_pool2d((~valid.to(device)).float(), self.latent_factor).bool()
            valid_latent = valid_latent.expand_as(depth_latent)
            for row, index in enumerate(missing):
                fresh[index] = (rgb_latent[row], depth_latent[row], valid_latent[row])
            if cache is not None:
                cache.update(fresh)
        rows = [fresh[i] if i in fresh else cache[i] for i in indices]
        return tuple(torch.stack(part) for part in zip(*rows))

    def prefill_latent_cache(self, batch=64):
        """
        Encode every dataset index into the latent cache, in order.

        :param batch: samples per VAE call
        """
        total = len(self.dataset)
        for start in range(0, total, batch):
            self.encode_samples(list(range(start, min(start + batch, total))))

    def compute_loss(self, rgb_latent, depth_latent, valid_latent, generator):
        """
        Marigold's loss for one micro-batch: masked MSE on the predicted velocity.

        :param rgb_latent: [B, C, h, w] scaled image latents
        :param depth_latent: [B, C, h, w] scaled latents of the normalised depth
        :param valid_latent: [B, C, h, w] bool, latent pixels with fully valid depth
        :param generator: torch.Generator for timesteps and noise
        :return: scalar loss tensor
        """
        config = self.config
        device = self.accelerator.device
        batch = rgb_latent.shape[0]
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,),
                                  generator=generator, device='cpu').to(device)
        if config.pyramid_noise:
            strength = config.pyramid_strength
            if config.pyramid_anneal:
                strength = annealed_strength(strength, timesteps,
                                             self.scheduler.config.num_train_timesteps)
            noise = pyramid_noise_like(depth_latent.cpu(), strength if not torch.is_tensor(
                strength) else strength.cpu(), generator=generator).to(device)
        else:
            noise = torch.randn(depth_latent.shape, generator=generator).to(device)
        noise = noise.to(depth_latent.dtype)
        alpha = self.alphas[timesteps].view(-1, 1, 1, 1).to(depth_latent.dtype)
        noisy = alpha.sqrt() * depth_latent + (1 - alpha).sqrt() * noise
        target = alpha.sqrt() * noise - (1 - alpha).sqrt() * depth_latent  # velocity
        text = self.embedding.repeat(batch, 1, 1)
        with self.accelerator.autocast():
            prediction = self.unet(torch.cat([rgb_latent, noisy], dim=1), timesteps,
                                   encoder_hidden_states=text, return_dict=False)[0]
        if not valid_latent.any():
            return (prediction * 0).sum()  # nothing valid: no gradient, but keep DDP in step
        return F.mse_loss(prediction.float()[valid_latent], target.float()[valid_latent])

    def train_step(self):
        """
        One optimiser step over ``grad_accumulation`` micro-batches.

        :return: the mean loss of the step
        """
        config = self.config
        process = self.accelerator.process_index
        total = 0.0
        for micro in range(config.grad_accumulation):
            generator = torch.Generator('cpu').manual_seed(
                int(np.random.default_rng([config.seed, self.step, micro, process, 1])
                    .integers(2 ** 62)))
            latents = self.encode_samples(
                batch_indices(self.dataset, config, self.step, micro, process))
            last = micro == config.grad_accumulation - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.unet)
            with sync:
                loss = self.compute_loss(*latents, generator)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f'loss became {loss.item()} at step {self.step}; the run is stopped. '
                        f'The last good checkpoint is kept in {self.output / "checkpoints"}: '
                        'lower lr, or check the data (depth ranges, invalid masks)')
                self.accelerator.backward(loss / config.grad_accumulation)
            total += loss.item()
        if config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.unet.parameters(), config.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unet.parameters())
        self.step += 1
        return total / config.grad_accumulation

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint_dir(self):
        """Folder holding the checkpoints of this run."""
        return self.output / 'checkpoints'

    def save_checkpoint(self):
        """
        Write the full state atomically (written aside, then renamed).

        :return: Path of the checkpoint
        """
        folder = self.checkpoint_dir()
        final = folder / f'step_{self.step:07d}'
        partial = folder / f'.partial_step_{self.step:07d}'
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        if self.accelerator.is_main_process:
            state = {'step': self.step, 'skipped': self._skipped(), 'losses': self.losses}
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

    def resume(self, checkpoint='latest'):
        """
        Restore the full state from a checkpoint folder (or the latest one of the run).

        :param checkpoint: folder path or 'latest'
        :return: Path restored from
        """
        if checkpoint == 'latest':
            found = sorted(self.checkpoint_dir().glob('step_*'))
            if not found:
                raise TrainingError(f'no checkpoint to resume from in {self.checkpoint_dir()}')
            checkpoint = found[-1]
        checkpoint = Path(checkpoint)
        if not (checkpoint / 'trainer_state.json').is_file():
            raise TrainingError(f'{checkpoint} is not a training checkpoint')
        self.accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / 'trainer_state.json').read_text())
        self.step = state['step']
        self.losses = state.get('losses', [])
        if self.ema is not None:
            self.ema.shadow = torch.load(checkpoint / 'ema.pt')
        return checkpoint

    def _skipped(self):
        return int(getattr(self.dataset, 'skipped', 0))

    # -- export -----------------------------------------------------------------------------

    def export(self, path=None):
        """
        Save the trained model in diffusers format (EMA weights when enabled).

        :param path: output folder, default <output_dir>/model
        :return: Path of the model
        """
        from diffusers import UNet2DConditionModel
        path = Path(path or self.output / 'model')
        unet = self.accelerator.unwrap_model(self.unet)
        if self.ema is not None:
            unet = UNet2DConditionModel.from_config(unet.config)
            self.ema.copy_to(unet.parameters())
        config = self.config
        save_marigold(path, unet, self.vae.float(), self.embedding.float(),
                      config.export_steps, config.export_resolution, fp16=config.export_fp16,
                      extra={'training': config_to_dict(config), 'steps_trained': self.step})
        return path

    # -- the loop ---------------------------------------------------------------------------

    def run(self):
        """
        Train to max_steps with logging and checkpoints, then export.

        :return: Path of the exported model
        """
        config = self.config
        self.output.mkdir(parents=True, exist_ok=True)
        with open(self.output / 'config.yaml', 'w') as stream:
            yaml.safe_dump(config_to_dict(config), stream, sort_keys=False)
        log = RunLog(self.output, config.logger, self.accelerator.is_main_process)
        progress = _progress(config, self.step, self.accelerator.is_main_process)
        samples = config.batch_size * config.grad_accumulation * self.accelerator.num_processes
        if self.latent_cache is not None and config.prefill_cache and not self.latent_cache:
            self.prefill_latent_cache()
        clock = time.perf_counter()
        while self.step < config.max_steps:
            loss = self.train_step()
            self.losses.append(loss)
            progress.update(1)
            progress.set_postfix(loss=f'{loss:.4f}')
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                elapsed = time.perf_counter() - clock
                log.write(self.step, loss, self.lr_schedule.get_last_lr()[0],
                          samples * config.log_every / max(elapsed, 1e-9), self._skipped())
                clock = time.perf_counter()
            if self.step % config.checkpoint_every == 0:
                self.save_checkpoint()
        progress.close()
        log.close()
        skipped = self._skipped()
        if skipped:
            print(f'{skipped} unreadable samples were skipped', file=sys.stderr)
        if self.accelerator.is_main_process:
            return self.export()
        return None


class RunLog:
    """Loss and learning rate to CSV (always) and TensorBoard (when chosen)."""

    def __init__(self, output, logger, active):
        """
        Open the log files.

        :param output: run folder
        :param logger: 'csv' or 'tensorboard'
        :param active: False on non-main processes
        """
        self.active = active
        self.writer = None
        if not active:
            return
        path = Path(output) / 'log.csv'
        new = not path.exists()
        self.stream = open(path, 'a', newline='')
        self.csv = csv.writer(self.stream)
        if new:
            self.csv.writerow(['step', 'loss', 'lr', 'samples_per_s', 'skipped'])
        if logger == 'tensorboard':
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise TrainingError('logger tensorboard needs the tensorboard package '
                                    '(pip install tensorboard)') from error
            self.writer = SummaryWriter(str(Path(output) / 'tensorboard'))

    def write(self, step, loss, lr, rate, skipped):
        """
        Record one line.

        :param step: optimiser step
        :param loss: loss value
        :param lr: learning rate
        :param rate: samples per second
        :param skipped: unreadable samples so far
        """
        if not self.active:
            return
        self.csv.writerow([step, f'{loss:.6f}', f'{lr:.3e}', f'{rate:.2f}', skipped])
        self.stream.flush()
        if self.writer is not None:
            self.writer.add_scalar('loss', loss, step)
            self.writer.add_scalar('lr', lr, step)

    def close(self):
        """Flush and close."""
        if self.active:
            self.stream.close()
            if self.writer is not None:
                self.writer.close()


def _progress(config, start, active):
    from tqdm import tqdm
    return tqdm(total=config.max_steps, initial=start, disable=not (active and config.progress),
                desc='training', unit='step', dynamic_ncols=True)


def main(argv=None):
    """
    Command line: ``marigold-train CONFIG [key=value ...] [--resume [CHECKPOINT]]``.

    :param argv: arguments (default sys.argv[1:])
    :return: exit code
    """
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='YAML training config')
    parser.add_argument('overrides', nargs='*', help='key=value settings over the config')
    parser.add_argument('--resume', nargs='?', const='latest', default=None,
                        help="resume from a checkpoint folder, or the run's latest")
    parser.add_argument('--export-only', action='store_true',
                        help='export the model of the resumed checkpoint and stop')
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config)
        if args.resume:
            trainer.resume(args.resume)
        path = trainer.export() if args.export_only else trainer.run()
    except (TrainingError, FileNotFoundError, ValueError) as error:
        print(f'marigold-train: {error}', file=sys.stderr)
        return 2
    if path is not None:
        print(f'model written to {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
