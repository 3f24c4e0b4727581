"""
Inference settings: frozen dataclasses that are the one source of defaults and checks.

The ROS side exposes every field as a parameter (marigold_ros.params) and config/depth.yaml
mirrors them, so a default changes here and nowhere else.  Each dataclass checks its fields
when it is made (``__post_init__``, which ``dataclasses.replace`` runs too), so an instance
that exists is valid and no caller checks it again.
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

#: processing_resolution sentinels (see :func:`resolve_processing_resolution`).
PROCESSING_RESOLUTION_MODEL_DEFAULT = 0
PROCESSING_RESOLUTION_INPUT_SIZE = -1
#: Inclusive bounds of processing_resolution.
PROCESSING_RESOLUTION_RANGE = (PROCESSING_RESOLUTION_INPUT_SIZE, 8192)
#: Inclusive bounds of InferenceConfig's numeric fields: the dataclass refuses values outside
#: them and the ROS parameters publish them as their ranges.
INFERENCE_RANGES = {
    'denoising_steps': (0, 1000), 'ensemble_size': (1, 64),
    'processing_resolution': PROCESSING_RESOLUTION_RANGE, 'seed': (0, 2 ** 32 - 1),
    'batch_size': (1, 256), 'warm_start_strength': (0.0, 1.0),
    'ensemble_regularizer': (0.0, 1000.0), 'ensemble_max_iter': (1, 1000),
    # 0: the alignment's BFGS runs its ensemble_max_iter iterations without stopping early.
    'ensemble_tol': (0.0, 1.0), 'ensemble_max_res': (16, 16384),
}
#: Inclusive bounds of GuidanceConfig's integer and ratio fields, as INFERENCE_RANGES (its
#: rates and thresholds need only be finite and > 0, which a closed range cannot say).
GUIDANCE_RANGES = {
    'denoising_steps': (1, 1000), 'iterations_per_step': (1, 100),
    'refine_iterations': (0, 10000), 'min_points': (2, 2 ** 31 - 1),
    'min_inlier_ratio': (0.0, 1.0), 'fit_seed': (0, 2 ** 32 - 1),
}
_INFERENCE_SENTINELS = {
    'denoising_steps': ' (0 = the model default)',
    'processing_resolution': f' ({PROCESSING_RESOLUTION_MODEL_DEFAULT} = the model default, '
                             f'{PROCESSING_RESOLUTION_INPUT_SIZE} = the input size)',
}


def _check_ranges(config, ranges, notes=None):
    """Raise ValueError naming the first field of ``config`` outside its inclusive range."""
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        if not low <= value <= high:  # NaN too
            raise ValueError(f'{name} must be within [{low}, {high}]'
                             f'{(notes or {}).get(name, "")}, got {value!r}')


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

    def __post_init__(self):
        """
        Check the settings.

        :raises ValueError: naming the bad field
        """
        if self.device not in DEVICES and not self.device.startswith('cuda:'):
            raise ValueError(f'unsupported device {self.device!r}; use one of {DEVICES} or '
                             'cuda:N')
        if self.dtype not in DTYPES:
            raise ValueError(f'unsupported dtype {self.dtype!r}; use one of {DTYPES}')
        if self.vae not in VAE_CHOICES:
            raise ValueError(f'unsupported vae {self.vae!r}; use one of {VAE_CHOICES}')
        if self.max_input_pixels <= 0:
            raise ValueError('max_input_pixels must be positive')
        if self.backend not in BACKENDS:
            raise ValueError(f'unsupported backend {self.backend!r}; use one of {BACKENDS}')


@dataclass(frozen=True)
class InferenceConfig:
    """Per-call settings; safe to change between frames without a reload."""

    # 0 means the model's own default (4 for Marigold v1-1, stored in model_index.json).
    denoising_steps: int = 0
    ensemble_size: int = 1
    # Longer image side fed to the model; 0 means the model's default, -1 the input size.
    processing_resolution: int = PROCESSING_RESOLUTION_MODEL_DEFAULT
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

    def __post_init__(self):
        """
        Check the settings.

        :raises ValueError: naming the bad field
        """
        _check_ranges(self, INFERENCE_RANGES, _INFERENCE_SENTINELS)


@dataclass(frozen=True)
class EstimatorConfig:
    """Everything a DepthEstimator needs."""

    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()


def resolve_processing_resolution(value, model_default):
    """
    Read processing_resolution: the one place its sentinels are interpreted.

    :param value: InferenceConfig.processing_resolution: the longer side in pixels,
        PROCESSING_RESOLUTION_MODEL_DEFAULT (0) or PROCESSING_RESOLUTION_INPUT_SIZE (-1)
    :param model_default: the resolution the model was published with, in pixels
    :return: the longer side the model works at in pixels, or None to keep the input size
    """
    if value == PROCESSING_RESOLUTION_MODEL_DEFAULT:
        return model_default
    if value == PROCESSING_RESOLUTION_INPUT_SIZE:
        return None
    return value


def override(config, **changes):
    """Return a copy of a frozen config with some fields replaced, rejecting unknown names."""
    known = {f.name for f in fields(config)}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f'unknown settings {sorted(unknown)} for {type(config).__name__}')
    return replace(config, **changes)


GUIDANCE_LOSSES = ('l1l2', 'huber')


@dataclass(frozen=True)
class GuidanceConfig:
    """
    Sparse guidance (Marigold-DC) settings: see :mod:`marigold_model.guidance`.

    The paper runs 10 DDIM steps on the CPU with one Adam update per step, learning rates
    0.05 on the latent and 0.005 on scale and shift.  These defaults (two updates per step,
    0.1 and 0.05, a looser global fit) were tuned with ``bench/guidance.py --tuning`` on
    held-out synthetic scenes with the bundled model, and checked on another set of scenes.
    """

    # DDIM steps of the guided denoising (each is a U-Net forward and backward pass).
    denoising_steps: int = 10
    # Adam updates per denoising step (each one more U-Net forward and backward).
    iterations_per_step: int = 2
    # Adam learning rate of the noisy depth latent.
    latent_lr: float = 0.1
    # Adam updates of the final clean latent through the decoder only (no U-Net; on the
    # bundled model it overfits the points: off by default).
    refine_iterations: int = 0
    # Adam learning rate of log(scale) and of the shift (in units of the global fit's scale).
    affine_lr: float = 0.05
    # Loss on the relative residual (pred - z) / z: 'l1l2' (the paper's L1 + L2) or 'huber'.
    loss: str = 'l1l2'
    # Where the Huber loss turns from quadratic to linear, in relative residual.
    huber_delta: float = 0.05
    # Give points off the global fit by more than outlier_threshold_rel (relative) no weight
    # in the loss.  Wider than the fit's inlier threshold: a weak prediction misses good
    # points by 10-20 %, and those are the ones the guidance must correct towards.
    robust_weights: bool = True
    outlier_threshold_rel: float = 0.3
    # Scale the latent gradient to the norm of the noise estimate (as Marigold-DC does).
    rescale_gradient: bool = True
    # The robust global fit that starts scale and shift and refuses hopeless input, with the
    # rules of ScaleTrackerConfig: fewest valid points, inlier threshold (relative), fewest
    # inliers / points, RANSAC seed.  Looser than the tracker's 0.1 / 0.4: the guidance
    # corrects the shape afterwards, and with a weak prediction a 10 % threshold refused a
    # third of the scenes and started the others from a worse fit.
    min_points: int = 20
    inlier_threshold_rel: float = 0.2
    min_inlier_ratio: float = 0.3
    fit_seed: int = 0

    def __post_init__(self):
        """
        Check the settings.

        :raises ValueError: naming the bad field
        """
        _check_ranges(self, GUIDANCE_RANGES)
        for name in ('latent_lr', 'affine_lr', 'huber_delta', 'inlier_threshold_rel',
                     'outlier_threshold_rel'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f'{name} must be finite and > 0, got {value}')
        if self.loss not in GUIDANCE_LOSSES:
            raise ValueError(f'loss must be one of {GUIDANCE_LOSSES}, got {self.loss!r}')
