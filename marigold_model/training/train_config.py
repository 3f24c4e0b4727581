"""
Training settings: TrainConfig and DataSpec, read from YAML, typed and checked once.

load_config turns YAML values into the declared types (``3e-5`` and ``'1e3'`` are numbers,
an unquoted ``no`` is mixed_precision 'no'); TrainConfig checks every setting when it is made,
so a bad value is refused by name before any model or data is loaded, however the config was
built.
"""

from dataclasses import asdict, dataclass, field, fields
import importlib
import inspect
import math
from pathlib import Path

import yaml

from .. import yaml12


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


@dataclass(frozen=True)
class DataSpec:
    """
    One training data source.

    TrainConfig checks its sources, naming each by its place in ``data``.

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
    """
    Every training setting, with the paper's values as defaults where they apply.

    Checked when made: a bad setting raises TrainingError naming it.
    """

    # Run folder: config.yaml, log.csv, checkpoints/step_NNNNNNN, the exported model/ and
    # tensorboard/.
    output_dir: str = 'runs/marigold'
    # A Marigold checkpoint, or a Stable Diffusion 2 one (its 4-channel U-Net input is widened):
    # a local diffusers folder, a Hugging Face id already downloaded, or 'bundled:<name>'.
    base_model: str = 'prs-eth/marigold-depth-v1-1'
    # Training sources, drawn by probability: a list of the keys below.
    data: tuple = (DataSpec(),)
    # Held-out sources in the same form, for validation (none: no validation). The training
    # loss of a small data set keeps falling as the model memorises it; the validation loss
    # and AbsRel say when the model stops improving on scenes it has not seen.
    val_data: tuple = ()
    # Draws of val_data scored (cropped as training draws, not flipped), the same ones with
    # the same timesteps and noise every time, so successive values compare.
    val_samples: int = 256
    # Validate (EMA weights when enabled) every this many steps and at the end.
    val_every: int = 500
    # Training crop height in pixels (a multiple of 8): each frame is resized to cover the
    # crop, then cropped at a random offset.
    height: int = 480
    # Training crop width in pixels (a multiple of 8).
    width: int = 640
    # Flip half of the samples horizontally.
    hflip: bool = True
    # Optimiser steps of the run; the learning-rate schedule spans them.
    max_steps: int = 30000
    # Samples per process per micro-step.
    batch_size: int = 2
    # Micro-steps per optimiser step: the batch of a step is processes x batch_size x
    # grad_accumulation (the paper: 1 x 2 x 16 = 32).
    grad_accumulation: int = 16
    # Learning rate after warm-up.
    lr: float = 3e-5
    # 'adam' (the paper's) or 'adamw'.
    optimizer: str = 'adam'
    # Weight decay: an L2 term with adam, decoupled with adamw.
    weight_decay: float = 0.0
    # Steps of linear warm-up from lr / warmup_steps to lr.
    warmup_steps: int = 100
    # After warm-up: 'exponential' or 'cosine' decay to lr x lr_final_ratio at max_steps, or
    # 'constant'.
    lr_schedule: str = 'exponential'
    # Final learning rate as a fraction of lr.
    lr_final_ratio: float = 0.01
    # Clip the gradient norm to this (0: no clipping).
    max_grad_norm: float = 1.0
    # 'no', 'fp16' or 'bf16': autocast of the U-Net; the frozen VAE and text embedding are
    # stored in it. bf16 needs an Ampere or newer GPU.
    mixed_precision: str = 'no'
    # Recompute U-Net activations during backward: less memory, slower steps.
    gradient_checkpointing: bool = False
    # Keep the U-Net and the VAE in channels-last memory layout: oneDNN's CPU convolutions and
    # tensor cores run faster on it (a tiny-model step on 2 CPU cores: 0.36 s against 0.43 s).
    channels_last: bool = True
    # Exponential moving average of the U-Net weights, exported instead of the last weights
    # (0 turns it off; e.g. 0.999).
    ema_decay: float = 0.0
    # Multi-resolution (pyramid) noise instead of white noise, as the paper trains.
    pyramid_noise: bool = True
    # Weight of pyramid level i is pyramid_strength ** i.
    pyramid_strength: float = 0.9
    # Scale the pyramid strength down linearly with the timestep.
    pyramid_anneal: bool = True
    # Share of draws trained at the last (pure-noise) timestep instead of a uniform one: the
    # only timestep a one-step estimate runs, drawn 1 in 1000 times otherwise (0 = the paper).
    final_timestep_share: float = 0.0
    # The last this many steps train the one-step estimate end to end (E2E-FT, Garcia et al.
    # 2024): the clean latent predicted at the last timestep is decoded by the frozen VAE and
    # scored against the depth with an affine-invariant L1 (per-sample least-squares scale and
    # shift), the error the evaluation measures (0 = velocity loss throughout).
    affine_depth_steps: int = 0
    # Depth is normalised per sample: this quantile of its valid pixels maps to -1 ...
    depth_low_percentile: float = 0.02
    # ... and this one to 1 (fractions: 0.98 is the 98th percentile).
    depth_high_percentile: float = 0.98
    # Seed of every draw: samples, crops, flips, timesteps and noise.
    seed: int = 0
    # Write a row of log.csv (and TensorBoard) every this many steps.
    log_every: int = 10
    # 'csv' (log.csv) or 'tensorboard' (log.csv and event files; needs tensorboard).
    logger: str = 'csv'
    # Save a checkpoint every this many steps, and at max_steps.
    checkpoint_every: int = 500
    # Checkpoints kept; older ones are deleted.
    keep_checkpoints: int = 2
    # Store the exported weights in float16 (half the size).
    export_fp16: bool = False
    # Show a progress bar.
    progress: bool = True
    # Keep the VAE latents of each (frame, crop, flip) after first use; only exact repeats are
    # served from it (readers are deterministic). Pays off when frames are at the training
    # resolution, so a frame has only two variants (flipped or not); saves two VAE encodes per
    # sample per step, which dominate small-model training on a CPU.
    cache_latents: bool = False
    # With cache_latents, encode every frame (both flips) before the first step, batched: for
    # small datasets at the training resolution this is cheaper than finding them step by step.
    prefill_cache: bool = False
    # Denoising steps the exported model runs by default.
    export_steps: int = 1
    # Processing resolution (longer image side) the exported model runs at by default; the
    # node and marigold-eval use it unless told otherwise.
    export_resolution: int = 768

    def __post_init__(self):
        """Refuse settings that cannot work (see :func:`_validate`)."""
        _validate(self)


# ---- configuration -----------------------------------------------------------------------------

_SETTING_TYPES = {f.name: f.type for f in fields(TrainConfig)}
_DATA_KEYS = tuple(f.name for f in fields(DataSpec))


def _coerce(name, value, kind):
    """
    Convert one setting read from YAML to its declared type, where it plainly is one.

    Numbers given as strings (quoted, or ``3e-5`` read by a YAML 1.1 loader), whole floats for
    integers (``1e3``) and ``no`` (false to YAML) for mixed_precision are converted. Anything
    else is returned as read, for TrainConfig to refuse by name.

    :param kind: declared type (bool, int, float or str)
    """
    if kind in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                return value
        if isinstance(number, (int, float)):
            if kind is float:
                return float(number)
            if isinstance(number, int):
                return number
            if math.isfinite(number) and float(number).is_integer():
                return int(number)
    if kind is str and not isinstance(value, str):
        if name == 'mixed_precision' and value is False:
            return 'no'  # YAML reads an unquoted no as false
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    return value


def _coerce_data(value, name='data'):
    """
    Turn a list of sources (``data``, ``val_data``: mappings) into DataSpec objects.

    :raises TrainingError: not a list of mappings, or unknown keys, naming them
    """
    if isinstance(value, (dict, DataSpec)):
        value = [value]
    if name == 'val_data' and value is None:
        value = []
    if not isinstance(value, (list, tuple)):
        raise TrainingError(f'{name} must be a list of sources ({", ".join(_DATA_KEYS)}), '
                            f'got {value!r}')
    specs = []
    for index, entry in enumerate(value):
        if isinstance(entry, DataSpec):
            specs.append(entry)
            continue
        if not isinstance(entry, dict):
            raise TrainingError(f'{name}[{index}] must be a mapping with keys '
                                f'{", ".join(_DATA_KEYS)}, got {entry!r}')
        unknown = sorted(set(entry) - set(_DATA_KEYS), key=str)
        if unknown:
            raise TrainingError(f'{name}[{index}]: unknown key(s) {unknown}; a source takes '
                                f'{", ".join(_DATA_KEYS)}')
        values = dict(entry)
        for key, kind in (('kind', str), ('root', str), ('probability', float)):
            if key in values:
                values[key] = _coerce(f'{name}[{index}].{key}', values[key], kind)
        if values.get('options') is None:
            values['options'] = {}
        specs.append(DataSpec(**values))
    return tuple(specs)


def load_config(path=None, overrides=()):
    """
    Read a YAML config and apply ``key=value`` overrides (values parsed as YAML).

    Every value is converted to its setting's type (``lr: 3e-5`` is a number); TrainConfig
    checks them before anything is loaded.

    :param path: YAML file or None for the defaults
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
        if key in ('data', 'val_data'):
            values[key] = _coerce_data(value, key)
        else:
            values[key] = _coerce(key, value, _SETTING_TYPES[key])
    return TrainConfig(**values)


# Readers by data kind: module, class, arguments set by the trainer (not options).
READERS = {
    'synthetic': ('..data.synthetic', 'SyntheticDataset',
                  ('config', 'height', 'width', 'transform')),
    'hypersim': ('..data.hypersim', 'HypersimDataset', ('root',)),
    'vkitti': ('..data.vkitti', 'VirtualKitti2Dataset', ('root',)),
    'folder': ('..data.rgbd_folder', 'RGBDFolderDataset', ('root',)),
    'bag': ('..data.bag_rgbd', 'BagRGBDDataset', ('path',)),
}


def _reader_options(kind):
    """Return the allowed and the required option names of a reader (its signature)."""
    module, name, fixed = READERS[kind]
    reader = getattr(importlib.import_module(module, __package__), name)
    parameters = list(inspect.signature(reader.__init__).parameters.values())[1:]
    allowed = {p.name for p in parameters if p.name not in fixed}
    required = {p.name for p in parameters
                if p.name not in fixed and p.default is inspect.Parameter.empty}
    if kind == 'synthetic':
        allowed.add('scene')
    return allowed, required


def _check_data_spec(index, spec, name='data'):
    """Reject a data source the reader would not accept, naming the key."""
    where = f'{name}[{index}]'
    if not isinstance(spec, DataSpec):
        raise TrainingError(f'{where} must be a DataSpec, got {spec!r}')
    if not isinstance(spec.kind, str) or spec.kind not in READERS:
        raise TrainingError(f'{where}: unknown data kind {spec.kind!r}; known: '
                            f'{", ".join(READERS)}')
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


# How a setting of each declared type is described when its value has another type.
_TYPE_WORDS = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}


def _has_type(value, kind):
    """Tell whether ``value`` is a ``kind`` (bool is no number here; floats are finite)."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _validate(config):
    """
    Reject settings that cannot work; messages name the setting.

    The one check of every TrainConfig, run when it is made (from YAML or in code).

    :raises TrainingError: the first bad setting
    """
    for name, kind in _SETTING_TYPES.items():
        value = getattr(config, name)
        if kind in _TYPE_WORDS and not _has_type(value, kind):
            raise TrainingError(f'{name} must be {_TYPE_WORDS[kind]}, got {value!r}')

    def require(condition, message):
        if not condition:
            raise TrainingError(message)

    require(config.height >= 8 and config.width >= 8 and not config.height % 8
            and not config.width % 8, 'height and width must be positive multiples of 8, got '
            f'{config.height}x{config.width}')
    for name in ('batch_size', 'grad_accumulation', 'max_steps', 'log_every', 'val_samples',
                 'val_every', 'checkpoint_every', 'keep_checkpoints', 'export_steps',
                 'export_resolution'):
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
    require(0 <= config.final_timestep_share <= 1, 'final_timestep_share must be in [0, 1], '
            f'got {config.final_timestep_share}')
    require(0 <= config.affine_depth_steps <= config.max_steps, 'affine_depth_steps must be '
            f'in [0, max_steps = {config.max_steps}], got {config.affine_depth_steps}')
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
    require(isinstance(config.val_data, (tuple, list)),
            f'val_data must be a list of sources, got {config.val_data!r}')
    for index, spec in enumerate(config.val_data):
        _check_data_spec(index, spec, 'val_data')
    require(not config.val_data or sum(spec.probability for spec in config.val_data) > 0,
            'val_data needs a source with a positive probability (or no sources)')


def config_to_dict(config):
    """Return a TrainConfig as a plain dict, for saving next to a run."""
    values = asdict(config)
    values['data'] = [asdict(spec) for spec in config.data]
    values['val_data'] = [asdict(spec) for spec in config.val_data]
    return values
