"""
Train a small AutoencoderKL for a tiny Marigold model, on RGB images and depth maps.

Marigold encodes both the image and the depth (normalised to [-1, 1], repeated to three
channels) with one frozen VAE, so a model trained from scratch needs a VAE that reconstructs
both. The latent scaling factor is then set so latents have unit standard deviation (the
role 0.18215 plays for Stable Diffusion).
"""

from dataclasses import dataclass
import time

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VaeTrainConfig:
    """Settings of the VAE training."""

    steps: int = 340
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6
    rgb_share: float = 0.5  # of each batch; the rest are depth maps (the easier of the two)
    seed: int = 0
    log_every: int = 20


def _rgb_tensor(rgb):
    """Return uint8 RGB [N, H, W, 3] as a float tensor [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(rgb.transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1


def _round_trip(vae, images, chunk=64):
    """Return ``images`` encoded (latent mode) and decoded by ``vae``, in chunks."""
    return torch.cat([vae.decode(vae.encode(part).latent_dist.mode()).sample
                      for part in images.split(chunk)])


def _batch(rgb, depth, rng, size, rgb_share=0.5):
    """RGB images (``rgb_share`` of ``size``, rounded) and depth maps, in [-1, 1]."""
    n_rgb = int(round(size * rgb_share))
    pick_rgb = rng.integers(0, rgb.shape[0], size=n_rgb)
    pick_depth = rng.integers(0, depth.shape[0], size=size - n_rgb)
    images = _rgb_tensor(rgb[pick_rgb])
    depths = torch.from_numpy(depth[pick_depth][:, None].copy()).float().repeat(1, 3, 1, 1)
    if rng.random() < 0.5:
        images, depths = images.flip(-1), depths.flip(-1)
    return torch.cat([images, depths])


def train_vae(vae, rgb, depth, config=VaeTrainConfig(), log=print):
    """
    Train ``vae`` in place on RGB uint8 [N, H, W, 3] and depth [N, H, W] in [-1, 1].

    The loss is L1 + MSE reconstruction plus a small KL term. ``log`` takes a message string.

    :return: list of losses per step
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps,
                                                   pct_start=0.1)
    vae.train()
    losses = []
    clock = time.perf_counter()
    for step in range(config.steps):
        batch = _batch(rgb, depth, rng, config.batch_size, config.rgb_share)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch)
                + config.kl_weight * posterior.kl().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0:
            rate = (time.perf_counter() - clock) / config.log_every
            log(f'vae step {step + 1}/{config.steps} loss {np.mean(losses[-20:]):.4f} '
                f'({rate:.2f} s/step)')
            clock = time.perf_counter()
    vae.eval()
    return losses


@torch.no_grad()
def fit_scaling_factor(vae, rgb, depth, count=256, seed=0):
    """Set and return ``vae.config.scaling_factor``: 1 / std of image and depth latents."""
    batch = _batch(rgb, depth, np.random.default_rng(seed), count)
    latents = torch.cat([vae.encode(part).latent_dist.mode() for part in batch.split(64)])
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def reconstruction_error(vae, depth, count=64):
    """Return the mean absolute error of the VAE round trip of depth maps, in normalised units."""
    maps = torch.from_numpy(depth[:count][:, None].copy()).float().repeat(1, 3, 1, 1)
    decoded = _round_trip(vae, maps).mean(1, keepdim=True)
    return float((decoded.clamp(-1, 1) - maps[:, :1]).abs().mean())


@torch.no_grad()
def rgb_psnr(vae, rgb):
    """Return the mean PSNR (dB, on [0, 1]) of the VAE round trip of uint8 RGB [N, H, W, 3]."""
    images = _rgb_tensor(rgb)
    decoded = _round_trip(vae, images).clamp(-1, 1)
    error = ((decoded - images) / 2).square().flatten(1).mean(1)
    return float((10 * torch.log10(1 / error)).mean())
