"""
Build Marigold-architecture models (8-channel U-Net, AutoencoderKL, DDIM) and save them.

Used for the tiny model this project trains and ships, and for randomly initialised models
in tests. The saved folder is a diffusers ``MarigoldDepthPipeline`` folder without text
encoder and tokenizer; the empty-prompt embedding sits beside the weights in
``empty_text_embedding.safetensors``.
"""

from dataclasses import asdict, dataclass
import math
from pathlib import Path
import shutil

import torch

from .loading import EMPTY_TEXT_FILE


@dataclass(frozen=True)
class TinyArchitecture:
    """Sizes of a small Marigold-architecture model; the defaults are the bundled tiny model."""

    vae_channels: tuple = (32, 64, 64)
    latent_channels: int = 4
    unet_channels: tuple = (64, 128, 192)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_tokens: int = 2
    text_dim: int = 64
    # Resolution the model was trained at; stored as its default processing resolution.
    processing_resolution: int = 64
    denoising_steps: int = 1


def marigold_scheduler_config():
    """Return Marigold v1-1's scheduler settings: zero-SNR trailing DDIM with v-prediction."""
    return {
        'num_train_timesteps': 1000, 'beta_start': 0.00085, 'beta_end': 0.012,
        'beta_schedule': 'scaled_linear', 'clip_sample': False, 'set_alpha_to_one': False,
        'steps_offset': 0, 'prediction_type': 'v_prediction', 'timestep_spacing': 'trailing',
        'rescale_betas_zero_snr': True,
    }


def build_vae(arch):
    """Make an untrained AutoencoderKL of ``arch``."""
    from diffusers import AutoencoderKL
    blocks = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=arch.latent_channels,
        down_block_types=('DownEncoderBlock2D',) * blocks,
        up_block_types=('UpDecoderBlock2D',) * blocks,
        block_out_channels=tuple(arch.vae_channels), layers_per_block=arch.layers_per_block,
        norm_num_groups=math.gcd(32, *arch.vae_channels), sample_size=arch.processing_resolution)


def build_unet(arch):
    """Make an untrained 8 -> 4 channel UNet2DConditionModel of ``arch``."""
    from diffusers import UNet2DConditionModel
    levels = len(arch.unet_channels)
    down = ('DownBlock2D',) + ('CrossAttnDownBlock2D',) * (levels - 1)
    up = ('CrossAttnUpBlock2D',) * (levels - 1) + ('UpBlock2D',)
    return UNet2DConditionModel(
        sample_size=arch.processing_resolution // 2 ** (len(arch.vae_channels) - 1),
        in_channels=2 * arch.latent_channels, out_channels=arch.latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(arch.unet_channels),
        layers_per_block=arch.layers_per_block, cross_attention_dim=arch.text_dim,
        attention_head_dim=arch.attention_head_dim,
        norm_num_groups=math.gcd(32, *arch.unet_channels))


def empty_text_embedding(arch, seed=0):
    """Make a fixed random [1, tokens, dim] stand-in for the empty-prompt embedding."""
    # Marigold only ever conditions on the empty prompt, so any fixed tensor serves a model
    # trained from scratch with it.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, arch.text_tokens, arch.text_dim, generator=generator)


def _detached_copy(module, dtype):
    """Return an eval-mode copy in ``dtype`` that shares nothing with ``module``."""
    # From config and state dict: hooks or wrappers on the original (training, accelerate)
    # are not carried over and the original's weights are never touched.
    copy = type(module).from_config(module.config)
    copy.load_state_dict(module.state_dict())
    return torch.nn.Module.to(copy, dtype=dtype).eval()  # every weight, as asked


def replace_folder(new, target):
    """Move the finished folder ``new`` (a sibling) to ``target``, replacing a previous one."""
    target = Path(target)
    old = target.with_name(f'.{target.name}.old')
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)  # until the next rename the previous model waits here, complete
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_marigold(path, unet, vae, embedding, default_steps, default_resolution, fp16=False,
                  extra=None, scheduler_config=None):
    """
    Save a Marigold model as a diffusers pipeline folder plus the empty-text embedding.

    The models given are not changed: the weights written are copies (cast to fp16 or fp32).
    The folder is written beside ``path`` and renamed into place when complete, so ``path``
    never holds a half-written model; a previous model there is replaced. A folder at
    ``path`` that is not a model folder (no model_index.json) is refused, not overwritten.

    :param embedding: [1, tokens, dim] empty-prompt embedding
    :param default_steps: denoising steps users get by default
    :param default_resolution: processing resolution users get by default
    :param fp16: store weights in half precision (halves the size; loaders upcast on CPU)
    :param extra: optional dict written as marigold_ros.json (training provenance)
    :param scheduler_config: DDIM settings (default :func:`marigold_scheduler_config`); give
        the noise schedule the model was trained with
    :return: Path of the folder
    """
    import json

    from diffusers import DDIMScheduler, MarigoldDepthPipeline
    from safetensors.torch import save_file
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir())
                                                and not (path / 'model_index.json').exists())):
        raise FileExistsError(f'{path} exists and is not a model folder; not overwriting it '
                              '(choose a new or empty folder)')
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f'.{path.name}.partial')
    shutil.rmtree(partial, ignore_errors=True)
    dtype = torch.float16 if fp16 else torch.float32
    try:
        pipe = MarigoldDepthPipeline(
            unet=_detached_copy(unet, dtype), vae=_detached_copy(vae, dtype),
            scheduler=DDIMScheduler(**(scheduler_config or marigold_scheduler_config())),
            text_encoder=None, tokenizer=None, prediction_type='depth', scale_invariant=True,
            shift_invariant=True, default_denoising_steps=default_steps,
            default_processing_resolution=default_resolution)
        pipe.save_pretrained(partial, safe_serialization=True)
        save_file({'embedding': embedding.detach().float().cpu().contiguous()},
                  partial / EMPTY_TEXT_FILE)
        with open(partial / 'marigold_ros.json', 'w') as stream:
            json.dump(extra or {}, stream, indent=2, default=str)
        replace_folder(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path


def build_random_marigold(path, arch=TinyArchitecture(), seed=0):
    """Save a randomly initialised Marigold-architecture model (tests only); return its Path."""
    torch.manual_seed(seed)
    return save_marigold(path, build_unet(arch), build_vae(arch),
                         empty_text_embedding(arch, seed), arch.denoising_steps,
                         arch.processing_resolution, extra={'architecture': asdict(arch)})
