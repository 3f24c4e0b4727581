"""
Inference settings: frozen dataclasses that are the one source of defaults.

The ROS side exposes every field as a parameter (marigold_ros.params) and config/depth.yaml
mirrors them, so a default changes here and nowhere else.
"""

from dataclasses import dataclass, fields, replace
import math

DEFAULT_MODEL = 'prs-eth/marigold-depth-v1-1'
# The tiny Marigold-architecture model trained by this project and shipped with the package.
BUNDLED_TINY_MODEL = 'bundled:marigold-tiny'

DEVICES = ('auto', 'cpu', 'cuda')
DTYPES = ('auto', 'float32', 'float16', 'bfloat16')
VAE_CHOICES = ('model', 'tiny')
BACKENDS = ('torch', 'onnxruntime')


@dataclass(frozen=True)
class ModelConfig:
    """
    Which weights to load and how to run them.

    Changing any of these needs the model to be reloaded.
    """

    # HF hub id (resolved from the local cache only), a local diffusers directory, or
    # 'bundled:<name>' for a model shipped inside marigold_model/models.
    model: str = DEFAULT_MODEL
    # 'auto' picks CUDA when available, else CPU.
    device: str = 'auto'
    # 'auto' is fp16 on CUDA and fp32 on CPU (CPU half precision is slow and inaccurate).
    dtype: str = 'auto'
    # 'model' keeps the model's own AutoencoderKL; 'tiny' swaps in a TAESD-style
    # AutoencoderTiny (about 10x cheaper, slightly blurrier) from `tiny_vae`.
    vae: str = 'model'
    tiny_vae: str = 'madebyollin/taesd'
    # GPU speed switches; harmless (ignored) on CPU.
    channels_last: bool = True
    compile: bool = False  # noqa: A003 - the name users know from torch.compile
    cuda_graphs: bool = False
    # Refuse frames larger than this many pixels before any work is done.
    max_input_pixels: int = 4096 * 4096
    # 'torch' runs the diffusers modules; 'onnxruntime' runs a folder written by
    # marigold-export-onnx (then `model` names that folder) with the TensorRT, CUDA or CPU
    # execution provider, the first of them installed ('cpu' device: CPU only).
    backend: str = 'torch'
    # Folder for TensorRT engines built by ONNX Runtime (minutes per input size, so kept);
    # '' = ~/.cache/marigold_ros/tensorrt.
    tensorrt_cache: str = ''


@dataclass(frozen=True)
class InferenceConfig:
    """Per-call settings; safe to change between frames without a reload."""

    # 0 means the model's own default (4 for Marigold v1-1, stored in model_index.json).
    denoising_steps: int = 0
    ensemble_size: int = 1
    # Longer image side fed to the model; 0 means the model's default, -1 the input size.
    processing_resolution: int = 0
    # Resize predictions back to the input size (else the processing size).
    match_input_resolution: bool = True
    seed: int = 0
    # Ensemble members / frames per U-Net call.
    batch_size: int = 4
    # Video warm start: 0 disables; otherwise the previous frame's depth latent is re-noised
    # to this strength (0..1 of the noise schedule) instead of starting from pure noise.
    warm_start_strength: float = 0.0
    # Ensembling (the paper's affine alignment): regulariser pulling the result to [0, 1],
    # BFGS iterations and the resolution the alignment is solved at.
    ensemble_regularizer: float = 0.02
    ensemble_max_iter: int = 2
    ensemble_tol: float = 1e-3
    ensemble_max_res: int = 1024


@dataclass(frozen=True)
class EstimatorConfig:
    """Everything a DepthEstimator needs."""

    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()


def validate_model_config(config):
    """
    Check a ModelConfig and raise ValueError naming the bad field.

    :param config: the ModelConfig to check
    :return: the same config
    """
    if config.device not in DEVICES and not config.device.startswith('cuda:'):
        raise ValueError(f'unsupported device {config.device!r}; use one of {DEVICES} or cuda:N')
    if config.dtype not in DTYPES:
        raise ValueError(f'unsupported dtype {config.dtype!r}; use one of {DTYPES}')
    if config.vae not in VAE_CHOICES:
        raise ValueError(f'unsupported vae {config.vae!r}; use one of {VAE_CHOICES}')
    if config.max_input_pixels <= 0:
        raise ValueError('max_input_pixels must be positive')
    if config.backend not in BACKENDS:
        raise ValueError(f'unsupported backend {config.backend!r}; use one of {BACKENDS}')
    return config


def validate_inference_config(config):
    """
    Check an InferenceConfig and raise ValueError naming the bad field.

    :param config: the InferenceConfig to check
    :return: the same config
    """
    if config.denoising_steps < 0:
        raise ValueError('denoising_steps must be >= 0 (0 = the model default)')
    if config.ensemble_size < 1:
        raise ValueError('ensemble_size must be >= 1')
    if config.processing_resolution < -1:
        raise ValueError('processing_resolution must be >= -1')
    if config.batch_size < 1:
        raise ValueError('batch_size must be >= 1')
    if not 0.0 <= config.warm_start_strength <= 1.0:
        raise ValueError('warm_start_strength must be within [0, 1]')
    if not (math.isfinite(config.ensemble_regularizer) and config.ensemble_regularizer >= 0):
        raise ValueError('ensemble_regularizer must be finite and >= 0')
    if config.ensemble_max_iter < 1:
        raise ValueError('ensemble_max_iter must be >= 1')
    if not config.ensemble_tol > 0:
        raise ValueError('ensemble_tol must be > 0')
    if config.ensemble_max_res < 1:
        raise ValueError('ensemble_max_res must be >= 1 (pixels of the longest edge)')
    return config


def override(config, **changes):
    """
    Return a copy of a frozen config with some fields replaced, rejecting unknown names.

    :param config: a frozen dataclass instance
    :param changes: field names and new values
    :return: the new instance
    """
    known = {f.name for f in fields(config)}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f'unknown settings {sorted(unknown)} for {type(config).__name__}')
    return replace(config, **changes)
