"""
Fine-tune Marigold on synthetic RGB-D data (the paper's recipe), on one CPU or many GPUs.

Usage::

    marigold-train CONFIG.yaml [key=value ...]
    accelerate launch -m marigold_model.trainer CONFIG.yaml [key=value ...]

The U-Net learns v-prediction on DDPM (1000 steps) with annealed multi-resolution noise; the
VAE is frozen and the empty-prompt embedding is computed once. Every step draws its samples,
crops, flips, timesteps and noise from generators seeded by (seed, step, micro-step, process):
the data is a stream in which every frame of a source is used once per pass over it, so a
resumed run repeats an uninterrupted one exactly. The learning rate is a function of the step.
The checkpoint still holds the full state (U-Net, optimiser, step, learning rate, RNG states,
EMA, counts of skipped samples).
"""

import contextlib
import csv
from dataclasses import asdict, dataclass, field, fields
import importlib
import inspect
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

from .. import yaml12
from ..alignment import normalize_percentile
from ..architecture import marigold_scheduler_config, save_marigold
from ..loading import _load_empty_text_embedding, read_pipeline_config, resolve_model_path
from ..noise import annealed_strength, pyramid_noise_like


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
    # Keep the VAE latents of each (frame, crop, flip) after first use; only exact repeats are
    # served from it (readers are deterministic). Pays off when frames are at the training
    # resolution, so a frame has only two variants (flipped or not); saves two VAE encodes per
    # sample per step, which dominate small-model training on a CPU.
    cache_latents: bool = False
    # With cache_latents, encode every frame (both flips) before the first step, batched: for
    # small datasets at the training resolution this is cheaper than finding them step by step.
    prefill_cache: bool = False
    # Exported model defaults (for users of the resulting model).
    export_steps: int = 1
    export_resolution: int = 768


# ---- configuration -----------------------------------------------------------------------------

_SETTING_TYPES = {f.name: f.type for f in fields(TrainConfig)}
_DATA_KEYS = tuple(f.name for f in fields(DataSpec))


def _coerce(name, value, kind):
    """
    Convert one setting read from YAML to its declared type.

    Numbers given as strings (quoted, or ``3e-5`` read by a YAML 1.1 loader) and ``no``
    (false to YAML) for mixed_precision are taken here.

    :param name: setting name, for the message
    :param value: value as read
    :param kind: declared type (bool, int, float or str)
    :return: the value as ``kind``
    :raises TrainingError: the value does not fit, naming the setting
    """
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TrainingError(f'{name} must be true or false, got {value!r}')
    if kind in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if isinstance(number, (int, float)):
            if kind is float:
                return float(number)
            if isinstance(number, int):
                return number
            if math.isfinite(number) and float(number).is_integer():
                return int(number)
        what = 'an integer' if kind is int else 'a number'
        raise TrainingError(f'{name} must be {what}, got {value!r}')
    if kind is str:
        if isinstance(value, str):
            return value
        if name == 'mixed_precision' and value is False:
            return 'no'  # YAML reads an unquoted no as false
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TrainingError(f'{name} must be a string, got {value!r}')
    return value


def _coerce_data(value):
    """
    Turn the ``data`` setting (a list of mappings) into DataSpec objects.

    :param value: list of dicts (or DataSpec)
    :return: tuple of DataSpec
    :raises TrainingError: not a list, unknown or badly typed keys, naming them
    """
    if isinstance(value, (dict, DataSpec)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TrainingError(f'data must be a list of sources ({", ".join(_DATA_KEYS)}), '
                            f'got {value!r}')
    specs = []
    for index, entry in enumerate(value):
        if isinstance(entry, DataSpec):
            specs.append(entry)
            continue
        if not isinstance(entry, dict):
            raise TrainingError(f'data[{index}] must be a mapping with keys '
                                f'{", ".join(_DATA_KEYS)}, got {entry!r}')
        unknown = sorted(set(entry) - set(_DATA_KEYS), key=str)
        if unknown:
            raise TrainingError(f'data[{index}]: unknown key(s) {unknown}; a source takes '
                                f'{", ".join(_DATA_KEYS)}')
        values = dict(entry)
        for key, kind in (('kind', str), ('root', str), ('probability', float)):
            if key in values:
                values[key] = _coerce(f'data[{index}].{key}', values[key], kind)
        if values.get('options') is None:
            values['options'] = {}
        if not isinstance(values['options'], dict):
            raise TrainingError(f'data[{index}].options must be a mapping, got '
                                f'{values["options"]!r}')
        specs.append(DataSpec(**values))
    return tuple(specs)


def load_config(path=None, overrides=()):
    """
    Read a YAML config and apply ``key=value`` overrides (values parsed as YAML).

    Every value is converted to its setting's type (``lr: 3e-5`` is a number) and checked
    before anything is loaded.

    :param path: YAML file or None for the defaults
    :param overrides: iterable of 'key=value' strings
    :return: TrainConfig
    :raises TrainingError: unreadable file, unknown keys or bad values, naming them
    """
    values = {}
    if path is not None:
        if not Path(path).is_file():
            raise TrainingError(f'config file {path} does not exist')
        try:
            with open(path) as stream:
                values = yaml12.load(stream) or {}
        except yaml.YAMLError as error:
            raise TrainingError(f'config file {path} is not valid YAML: {error}') from None
        if not isinstance(values, dict):
            raise TrainingError(f'config file {path} must hold a mapping of settings')
    for item in overrides:
        if '=' not in item:
            raise TrainingError(f'override {item!r} is not key=value')
        key, value = item.split('=', 1)
        try:
            values[key.strip()] = yaml12.load(value)
        except yaml.YAMLError as error:
            raise TrainingError(f'override {item!r}: value is not valid YAML: {error}') from None
    unknown = set(values) - set(_SETTING_TYPES)
    if unknown:
        raise TrainingError(f'unknown training settings: {sorted(unknown, key=str)}')
    for key, value in values.items():
        if key == 'data':
            values[key] = _coerce_data(value)
        else:
            values[key] = _coerce(key, value, _SETTING_TYPES[key])
    config = TrainConfig(**values)
    validate_config(config)
    return config


# Readers by data kind: module, class, arguments set by the trainer (not options).
_READERS = {
    'synthetic': ('..data.synthetic', 'SyntheticDataset',
                  ('config', 'height', 'width', 'transform')),
    'hypersim': ('..data.hypersim', 'HypersimDataset', ('root',)),
    'vkitti': ('..data.vkitti', 'VirtualKitti2Dataset', ('root',)),
    'folder': ('..data.rgbd_folder', 'RGBDFolderDataset', ('root',)),
    'bag': ('..data.bag_rgbd', 'BagRGBDDataset', ('path',)),
}


def _reader_options(kind):
    """Return the allowed and the required option names of a reader (its signature)."""
    module, name, fixed = _READERS[kind]
    reader = getattr(importlib.import_module(module, __package__), name)
    parameters = list(inspect.signature(reader.__init__).parameters.values())[1:]
    allowed = {p.name for p in parameters if p.name not in fixed}
    required = {p.name for p in parameters
                if p.name not in fixed and p.default is inspect.Parameter.empty}
    if kind == 'synthetic':
        allowed.add('scene')
    return allowed, required


def _check_data_spec(index, spec):
    """Reject a data source the reader would not accept, naming the key."""
    where = f'data[{index}]'
    if not isinstance(spec, DataSpec):
        raise TrainingError(f'{where} must be a DataSpec, got {spec!r}')
    if spec.kind not in _READERS:
        raise TrainingError(f'{where}: unknown data kind {spec.kind!r}; known: '
                            f'{", ".join(_READERS)}')
    if not isinstance(spec.root, str):
        raise TrainingError(f'{where}.root must be a string, got {spec.root!r}')
    if spec.kind != 'synthetic' and not spec.root:
        raise TrainingError(f'{where} ({spec.kind}): root is empty; give the folder or file')
    probability = spec.probability
    if (isinstance(probability, bool) or not isinstance(probability, (int, float))
            or not math.isfinite(probability) or probability < 0):
        raise TrainingError(f'{where}.probability must be a number >= 0, got {probability!r}')
    if not isinstance(spec.options, dict):
        raise TrainingError(f'{where}.options must be a mapping, got {spec.options!r}')
    allowed, required = _reader_options(spec.kind)
    unknown = sorted(set(spec.options) - allowed, key=str)
    if unknown:
        raise TrainingError(f'{where} ({spec.kind}): unknown option(s) {unknown}; the reader '
                            f'takes {sorted(allowed)}')
    missing = sorted(required - set(spec.options))
    if missing:
        raise TrainingError(f'{where} ({spec.kind}): missing option(s) {missing}')
    if spec.kind == 'synthetic' and 'scene' in spec.options:
        from ..data.synthetic import SceneConfig
        scene = spec.options['scene']
        known = {f.name for f in fields(SceneConfig)} - {'height', 'width'}
        if not isinstance(scene, dict):
            raise TrainingError(f'{where}.options.scene must be a mapping, got {scene!r}')
        unknown = sorted(set(scene) - known, key=str)
        if unknown:
            raise TrainingError(f'{where}.options.scene: unknown key(s) {unknown} (height and '
                                'width come from the training resolution)')


def validate_config(config):
    """
    Reject settings that cannot work, before anything is loaded; messages name the setting.

    :param config: TrainConfig
    :raises TrainingError: the first bad setting
    """
    for name, kind in _SETTING_TYPES.items():
        value = getattr(config, name)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value))
        elif kind is str:
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise TrainingError(f'{name} must be of type {kind.__name__}, got {value!r}')

    def require(condition, message):
        if not condition:
            raise TrainingError(message)

    require(config.height >= 8 and config.width >= 8 and not config.height % 8
            and not config.width % 8, 'height and width must be positive multiples of 8, got '
            f'{config.height}x{config.width}')
    for name in ('batch_size', 'grad_accumulation', 'max_steps', 'log_every',
                 'checkpoint_every', 'keep_checkpoints', 'export_steps', 'export_resolution'):
        require(getattr(config, name) >= 1, f'{name} must be >= 1, got {getattr(config, name)}')
    for name in ('warmup_steps', 'seed', 'weight_decay', 'max_grad_norm', 'pyramid_strength'):
        require(getattr(config, name) >= 0, f'{name} must be >= 0, got {getattr(config, name)}')
    require(config.lr > 0, f'lr must be > 0, got {config.lr}')
    require(config.lr_schedule in ('exponential', 'cosine', 'constant'),
            f'unknown lr_schedule {config.lr_schedule!r} (exponential, cosine or constant)')
    if config.lr_schedule == 'exponential':
        require(config.lr_final_ratio > 0, 'lr_final_ratio must be > 0 with the exponential '
                f'lr_schedule (it decays to lr * lr_final_ratio), got {config.lr_final_ratio}')
    else:
        require(config.lr_final_ratio >= 0,
                f'lr_final_ratio must be >= 0, got {config.lr_final_ratio}')
    require(config.optimizer in ('adam', 'adamw'),
            f'unknown optimizer {config.optimizer!r} (adam or adamw)')
    require(config.logger in ('csv', 'tensorboard'),
            f'unknown logger {config.logger!r} (csv or tensorboard)')
    require(config.mixed_precision in ('no', 'fp16', 'bf16'),
            f'unknown mixed_precision {config.mixed_precision!r} (no, fp16 or bf16)')
    require(0 <= config.ema_decay < 1,
            f'ema_decay must be in [0, 1) (0 turns EMA off), got {config.ema_decay}')
    low, high = config.depth_low_percentile, config.depth_high_percentile
    require(low <= 1 and high <= 1, 'depth_low_percentile and depth_high_percentile are '
            f'fractions in [0, 1] (0.02 and 0.98 for 2 % and 98 %), got {low} and {high}')
    require(0 <= low < high, 'need 0 <= depth_low_percentile < depth_high_percentile, got '
            f'{low} and {high}')
    require(isinstance(config.data, (tuple, list)) and len(config.data) > 0,
            'data needs at least one source')
    for index, spec in enumerate(config.data):
        _check_data_spec(index, spec)
    require(sum(spec.probability for spec in config.data) > 0,
            'data needs at least one source with a positive probability')


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
    if spec.kind not in _READERS:
        raise TrainingError(f'unknown data kind {spec.kind!r}')
    options = dict(spec.options)
    module, name, _ = _READERS[spec.kind]
    reader = getattr(importlib.import_module(module, __package__), name)
    if spec.kind == 'synthetic':
        from ..data.synthetic import SceneConfig
        scene = dict(options.pop('scene', None) or {})
        scene = SceneConfig(height=config.height, width=config.width,
                            **{k: tuple(v) if isinstance(v, list) else v
                               for k, v in scene.items()})
        return reader(config=scene, **options)
    return reader(spec.root, **options)


def build_training_data(config, sources=None):
    """
    Build the mixed training set: sources drawn by probability, resized, cropped, flipped.

    :param config: TrainConfig
    :param sources: optional datasets standing in for ``config.data`` (one per entry, e.g.
        frames already in memory); the probabilities still come from ``config.data``
    :return: MixedDataset
    """
    from ..data.mixing import MixedDataset, TrainTransform
    if sources is None:
        sources = [build_source(spec, config) for spec in config.data]
    elif len(sources) != len(config.data):
        raise TrainingError(f'{len(sources)} sources given for {len(config.data)} data entries')
    probabilities = [spec.probability for spec in config.data]
    transform = TrainTransform(config.height, config.width, hflip=config.hflip)
    return MixedDataset(sources, probabilities, seed=config.seed, transform=transform)


def sample_to_tensors(sample, config):
    """
    Turn one Sample into model inputs: RGB and normalised depth in [-1, 1], valid mask.

    A sample without any valid depth pixel gets depth 0 and an all-False mask: it teaches
    nothing (the loss is masked) but does not stop training.

    :param sample: Sample at the training resolution
    :param config: TrainConfig
    :return: (rgb [3, H, W], depth [1, H, W], valid [1, H, W]) tensors
    """
    rgb = torch.from_numpy(sample.rgb.transpose(2, 0, 1).copy()).float() / 127.5 - 1.0
    valid = np.asarray(sample.valid, dtype=bool) & np.isfinite(sample.depth)
    if valid.any():
        depth = normalize_percentile(sample.depth, valid, config.depth_low_percentile,
                                     config.depth_high_percentile)
    else:
        depth = np.zeros(valid.shape, np.float32)
    depth = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]
    valid = torch.from_numpy(np.ascontiguousarray(valid))[None]
    return rgb, depth, valid


def draw_numbers(config, step, micro, process, processes):
    """
    Positions in the data stream of one (step, micro-step, process): the same every time.

    Draws are numbered step by step, micro-step by micro-step, process by process, so all
    processes together walk the stream once (each frame once per pass over its source).

    :param config: TrainConfig
    :param step: optimiser step
    :param micro: micro-step within gradient accumulation
    :param process: process index
    :param processes: number of processes
    :return: list of int draw numbers
    """
    first = ((step * config.grad_accumulation + micro) * processes + process) * config.batch_size
    return list(range(first, first + config.batch_size))


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


# The entries of a scheduler config that define the noise schedule the model is trained on.
SCHEDULE_KEYS = ('num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule',
                 'trained_betas', 'rescale_betas_zero_snr')


def training_scheduler(scheduler_config):
    """
    DDPM with 1000 steps and v-prediction, keeping the base model's beta schedule.

    :param scheduler_config: the base model's scheduler_config.json entries
    :return: DDPMScheduler
    """
    from diffusers import DDPMScheduler
    values = {k: scheduler_config[k] for k in SCHEDULE_KEYS
              if scheduler_config.get(k) is not None}
    return DDPMScheduler(prediction_type='v_prediction', clip_sample=False, **values)


def export_scheduler_config(scheduler):
    """
    Inference (DDIM) scheduler settings for a model trained with ``scheduler``.

    The noise schedule (betas, zero-SNR rescaling, length) and the prediction type are those
    of training; the sampling settings are Marigold v1-1's (trailing timesteps, so one step
    starts from the noisiest timestep).

    :param scheduler: the training DDPMScheduler
    :return: dict for DDIMScheduler
    """
    values = marigold_scheduler_config()
    for key in SCHEDULE_KEYS:
        value = scheduler.config.get(key)
        if key == 'trained_betas':
            if value is not None:
                values[key] = list(np.asarray(value, dtype=np.float64).tolist())
            continue
        values[key] = value
    values['prediction_type'] = scheduler.config.prediction_type
    return values


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


def find_checkpoint(output_dir, checkpoint='latest'):
    """
    Folder of a training checkpoint: a given one, or the latest of a run.

    :param output_dir: the run's output folder
    :param checkpoint: folder path or 'latest'
    :return: Path
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


# ---- the run ---------------------------------------------------------------------------------


class Trainer:
    """One training run: set-up, steps, checkpoints, logging and export."""

    def __init__(self, config, dataset=None):
        """
        Load the data and the base model, prepare accelerate.

        :param config: TrainConfig
        :param dataset: optional dataset yielding Sample objects at the training resolution
            (tests, recipes); anything but a MixedDataset is drawn from as its only source
        """
        from accelerate import Accelerator

        from ..data.mixing import MixedDataset
        validate_config(config)
        self.config = config
        self.output = Path(config.output_dir)
        base_path = resolve_model_path(config.base_model)  # cheap checks first: model, data
        if dataset is None:
            dataset = build_training_data(config)
        elif not isinstance(dataset, MixedDataset):
            dataset = MixedDataset([dataset], [1.0], seed=config.seed)
        self.dataset = dataset
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision)
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
        unet.train()
        optimizer_class = torch.optim.AdamW if config.optimizer == 'adamw' else torch.optim.Adam
        optimizer = optimizer_class(unet.parameters(), lr=config.lr,
                                    weight_decay=config.weight_decay)
        # The learning rate is set from self.step before every optimiser step (set_lr), not by
        # an accelerate-prepared scheduler: that one steps once per process per optimiser step
        # and not at all on skipped fp16 steps, so it drifts from the step count.
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.ema = (ExponentialAverage(self.unet.parameters(), config.ema_decay)
                    if config.ema_decay > 0 else None)
        self.alphas = self.scheduler.alphas_cumprod.to(device)
        self.latent_cache = {} if config.cache_latents else None
        self.step = 0
        self.losses = []
        self.no_depth = 0  # drawn samples without any valid depth pixel (taught nothing)
        self.last_lr = self.set_lr()

    # -- learning rate ----------------------------------------------------------------------

    def lr_at(self, step):
        """
        Learning rate of an optimiser step.

        :param step: optimiser step (0 for the first)
        :return: float
        """
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
        return [(rgb_latent[row], depth_latent[row], valid_latent[row], empty[row])
                for row in range(len(samples))]

    @torch.no_grad()
    def encode_samples(self, numbers):
        """
        Latents of draws of the data stream: RGB latent, depth latent, latent validity.

        With ``cache_latents``, a draw whose (frame, crop, flip) was encoded before is served
        from the cache; nothing else is cached.

        :param numbers: draw numbers (see :func:`draw_numbers`)
        :return: ([B, C, h, w], [B, C, h, w], [B, C, h, w] bool, [B] bool no valid depth)
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
        """
        Encode every frame's variants (both flips of frames at the training size), batched.

        :param batch: samples per VAE call
        """
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
                strength = annealed_strength(strength, timesteps.cpu(),
                                             self.scheduler.config.num_train_timesteps)
            noise = pyramid_noise_like(depth_latent.cpu().float(), strength,
                                       generator=generator).to(device)
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
        processes = self.accelerator.num_processes
        self.last_lr = self.set_lr()
        total = 0.0
        for micro in range(config.grad_accumulation):
            generator = torch.Generator('cpu').manual_seed(
                int(np.random.default_rng([config.seed, self.step, micro, process, 1])
                    .integers(2 ** 62)))
            *latents, empty = self.encode_samples(
                draw_numbers(config, self.step, micro, process, processes))
            self._count_no_depth(int(empty.sum()))
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
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unet.parameters())
        self.step += 1
        return total / config.grad_accumulation

    def _count_no_depth(self, count):
        if count and not self.no_depth:
            print(f'marigold-train: step {self.step} drew a sample without any valid depth; '
                  'such samples are masked out of the loss and counted (no_depth in log.csv)',
                  file=sys.stderr)
        self.no_depth += count

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
            state = {'step': self.step, 'lr': self.lr_at(self.step), 'skipped': self._skipped(),
                     'no_depth': self.no_depth, 'losses': self.losses}
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
        checkpoint = find_checkpoint(self.output, checkpoint)
        self.accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / 'trainer_state.json').read_text())
        self.step = state['step']
        self.losses = state.get('losses', [])
        self.no_depth = int(state.get('no_depth', 0))
        if hasattr(type(self.dataset), 'skipped'):
            self.dataset.skipped = int(state.get('skipped', 0))
        if self.ema is not None:
            self.ema.shadow = torch.load(checkpoint / 'ema.pt')
        self.last_lr = self.lr_at(max(self.step - 1, 0))
        self.set_lr()
        return checkpoint

    def _skipped(self):
        return int(getattr(self.dataset, 'skipped', 0))

    # -- export -----------------------------------------------------------------------------

    def export(self, path=None):
        """
        Save the trained model in diffusers format (EMA weights when enabled).

        The live model is not touched (the export works on copies) and the folder appears
        complete or not at all (written aside, then renamed into place).

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
        save_marigold(path, unet, self.vae, self.embedding, config.export_steps,
                      config.export_resolution, fp16=config.export_fp16,
                      extra={'training': config_to_dict(config), 'steps_trained': self.step},
                      scheduler_config=export_scheduler_config(self.scheduler))
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
        log = RunLog(self.output, config.logger, self.accelerator.is_main_process,
                     start=self.step)
        progress = _progress(config, self.step, self.accelerator.is_main_process)
        samples = config.batch_size * config.grad_accumulation * self.accelerator.num_processes
        if self.latent_cache is not None and config.prefill_cache and not self.latent_cache:
            self.prefill_latent_cache()
        clock = time.perf_counter()
        logged = self.step
        while self.step < config.max_steps:
            loss = self.train_step()
            self.losses.append(loss)
            progress.update(1)
            progress.set_postfix(loss=f'{loss:.4f}')
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                elapsed = time.perf_counter() - clock
                log.write(self.step, loss, self.last_lr,
                          samples * (self.step - logged) / max(elapsed, 1e-9), self._skipped(),
                          self.no_depth)
                clock, logged = time.perf_counter(), self.step
            if self.step % config.checkpoint_every == 0 or self.step == config.max_steps:
                self.save_checkpoint()
        progress.close()
        log.close()
        skipped = self._skipped()
        if skipped:
            print(f'{skipped} unreadable samples were skipped', file=sys.stderr)
        if self.no_depth:
            print(f'{self.no_depth} drawn samples had no valid depth and taught nothing',
                  file=sys.stderr)
        if self.accelerator.is_main_process:
            return self.export()
        return None


LOG_COLUMNS = ('step', 'loss', 'lr', 'samples_per_s', 'skipped', 'no_depth')


class RunLog:
    """Loss and learning rate to CSV (always) and TensorBoard (when chosen)."""

    def __init__(self, output, logger, active, start=0):
        """
        Open the log files; rows after ``start`` (left by an interrupted run) are dropped.

        :param output: run folder
        :param logger: 'csv' or 'tensorboard'
        :param active: False on non-main processes
        :param start: step the run starts (or resumes) from
        """
        self.active = active
        self.writer = None
        if not active:
            return
        path = Path(output) / 'log.csv'
        self.columns = list(LOG_COLUMNS)
        rows = []
        if path.exists():
            with open(path, newline='') as stream:
                rows = list(csv.reader(stream))
        if rows and 'step' in rows[0]:
            self.columns = rows[0]
            kept = [row for row in rows[1:] if _row_step(row, self.columns) <= start]
            if len(kept) != len(rows) - 1:
                partial = path.with_name('.log.csv.partial')
                with open(partial, 'w', newline='') as stream:
                    csv.writer(stream).writerows([self.columns] + kept)
                partial.replace(path)
        else:
            with open(path, 'w', newline='') as stream:
                csv.writer(stream).writerow(self.columns)
        self.stream = open(path, 'a', newline='')
        self.csv = csv.DictWriter(self.stream, self.columns, extrasaction='ignore')
        if logger == 'tensorboard':
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise TrainingError('logger tensorboard needs the tensorboard package '
                                    '(pip install tensorboard)') from error
            self.writer = SummaryWriter(str(Path(output) / 'tensorboard'),
                                        purge_step=start + 1 if start else None)

    def write(self, step, loss, lr, rate, skipped, no_depth=0):
        """
        Record one line.

        :param step: optimiser step
        :param loss: loss value
        :param lr: learning rate of the step
        :param rate: samples per second
        :param skipped: unreadable samples so far
        :param no_depth: drawn samples without valid depth so far
        """
        if not self.active:
            return
        self.csv.writerow({'step': step, 'loss': f'{loss:.6f}', 'lr': f'{lr:.3e}',
                           'samples_per_s': f'{rate:.2f}', 'skipped': skipped,
                           'no_depth': no_depth})
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


def _row_step(row, columns):
    try:
        return int(row[columns.index('step')])
    except (ValueError, IndexError):
        return math.inf  # a torn or malformed row: drop it


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
            trainer.resume(resume)
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
