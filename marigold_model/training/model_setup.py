"""
Model pieces of a training run: the base model, its widened U-Net input, the schedulers.

load_base reads a Marigold or Stable Diffusion 2 checkpoint; training uses DDPM with
v-prediction on the base model's noise schedule, and the exported model gets a DDIM
configuration that matches it. ExponentialAverage keeps the EMA of the trained weights.
"""

import contextlib
import json

import numpy as np
import torch

from .train_config import TrainingError
from ..architecture import marigold_scheduler_config
from ..loading import _load_empty_text_embedding, read_pipeline_config, resolve_model_path


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
    Load the starting Marigold or Stable Diffusion 2 model, its U-Net widened to 8 channels.

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
    """Return a v-prediction DDPMScheduler on the base model's noise schedule."""
    from diffusers import DDPMScheduler
    values = {k: scheduler_config[k] for k in SCHEDULE_KEYS
              if scheduler_config.get(k) is not None}
    return DDPMScheduler(prediction_type='v_prediction', clip_sample=False, **values)


def export_scheduler_config(scheduler):
    """
    Return the DDIM settings for a model trained with the DDPM ``scheduler``.

    The noise schedule (betas, zero-SNR rescaling, length) and the prediction type are those
    of training; the sampling settings are Marigold v1-1's (trailing timesteps, so one step
    starts from the noisiest timestep).
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
        """Start the average at ``parameters``; ``decay`` applies per optimiser step."""
        self.decay = decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters):
        """Move the average towards ``parameters`` (the same tensors as at the start)."""
        for shadow, param in zip(self.shadow, parameters):
            shadow.lerp_(param.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, parameters):
        """Write the average into ``parameters``."""
        for shadow, param in zip(self.shadow, parameters):
            param.copy_(shadow)

    @contextlib.contextmanager
    def applied_to(self, parameters):
        """Hold the average in ``parameters`` for a block, then give them their values back."""
        parameters = list(parameters)
        with torch.no_grad():
            live = [param.detach().clone() for param in parameters]
        self.copy_to(parameters)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(parameters, live):
                    param.copy_(value)
