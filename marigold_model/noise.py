"""
Multi-resolution ("pyramid") noise with annealed strength, as Marigold trains with.

Low-frequency noise components make the model learn the global layout of the scene; the
strength is annealed with the timestep so late (low-noise) steps see nearly white noise.
"""

import torch
import torch.nn.functional as F


def pyramid_noise_like(latent, strength=0.9, generator=None, levels=10):
    """
    Gaussian noise plus noise at compounding coarser sizes, level ``i`` weighted strength ** i.

    Marigold's ``multi_res_noise_like`` ('original' strategy), draw for draw: a full-size
    ``randn``; then per level ``i = 0, 1, ...``: ``r = 2 + 2 * rand``, the size shrinks by
    ``r ** i`` (so level 0 is another full-size noise of weight 1), a ``randn`` at that size is
    upsampled bilinearly and added; stop after a side reaches 1; divide by the standard
    deviation of the whole batch.

    :param latent: tensor whose shape and device the noise takes ([B, C, H, W]); the noise is
        drawn in float32 and returned in the latent's dtype
    :param strength: float or [B] tensor of per-sample strengths (0 gives white noise)
    :param generator: torch.Generator on the latent's device, for reproducibility
    :param levels: maximum number of levels (10 in Marigold)
    :return: noise tensor like ``latent``
    """
    batch, channels, height, width = latent.shape
    device = latent.device
    if torch.is_tensor(strength):
        strength = strength.reshape(-1, 1, 1, 1).to(device)
    noise = torch.randn(latent.shape, generator=generator, device=device)
    low_h, low_w = height, width
    for level in range(levels):
        factor = torch.rand(1, generator=generator, device=device) * 2 + 2
        low_h = max(1, int(low_h / factor ** level))
        low_w = max(1, int(low_w / factor ** level))
        coarse = torch.randn(batch, channels, low_h, low_w, generator=generator, device=device)
        noise += F.interpolate(coarse.to(latent), (height, width), mode='bilinear') \
            * strength ** level
        if low_h == 1 or low_w == 1:
            break
    return (noise / noise.std()).to(latent.dtype)


def annealed_strength(strength, timesteps, num_train_timesteps):
    """Return the [B] per-sample strengths, scaled down linearly with the timestep."""
    return strength * timesteps.float() / num_train_timesteps
