"""
Multi-resolution ("pyramid") noise with annealed strength, as Marigold trains with.

Low-frequency noise components make the model learn the global layout of the scene; the
strength is annealed with the timestep so late (low-noise) steps see nearly white noise.
"""

import torch
import torch.nn.functional as F


def pyramid_noise_like(latent, strength=0.9, generator=None, levels=10):
    """
    Gaussian noise plus upsampled coarser noise weighted by strength ** level.

    Follows Marigold's ``multi_res_noise_like`` ('original' strategy): each level shrinks the
    size by a random factor in [2, 4) compounded per level, noise is upsampled bilinearly and
    the sum is renormalised to unit standard deviation over the batch.

    :param latent: tensor whose shape, device and dtype the noise takes ([B, C, H, W])
    :param strength: float or [B] tensor of per-sample strengths (0 gives white noise)
    :param generator: torch.Generator on the latent's device, for reproducibility
    :param levels: maximum number of coarser levels
    :return: noise tensor like ``latent``
    """
    batch, channels, height, width = latent.shape
    if torch.is_tensor(strength):
        strength = strength.reshape(-1, 1, 1, 1).to(latent)
    noise = torch.randn(latent.shape, generator=generator, device=latent.device,
                        dtype=latent.dtype)
    low_h, low_w = height, width
    for level in range(1, levels):
        factor = torch.rand(1, generator=generator, device=latent.device).item() * 2 + 2
        low_h = max(1, int(low_h / factor ** level))
        low_w = max(1, int(low_w / factor ** level))
        coarse = torch.randn((batch, channels, low_h, low_w), generator=generator,
                             device=latent.device, dtype=latent.dtype)
        noise = noise + F.interpolate(coarse, (height, width), mode='bilinear') * strength ** level
        if low_h == 1 or low_w == 1:
            break
    return noise / noise.std()


def annealed_strength(strength, timesteps, num_train_timesteps):
    """
    Per-sample pyramid strength, scaled down linearly with the timestep.

    :param strength: base strength (0.9 in the paper)
    :param timesteps: [B] integer timesteps
    :param num_train_timesteps: length of the training schedule (1000)
    :return: [B] float tensor
    """
    return strength * timesteps.float() / num_train_timesteps
