"""
The three network calls of Marigold (encode, U-Net, decode) behind one small interface.

DepthEstimator runs its DDIM loop, batching, ensembling and warm start on torch tensors and
calls the networks only through an object with ``encode``, ``unet`` and ``decode``: the torch
modules here (:class:`TorchNetworks`) or ONNX Runtime sessions
(:class:`marigold_model.onnx_backend.OnnxRuntimeNetworks`). The wrapper modules below are also
what :mod:`marigold_model.onnx_export` exports, so both backends compute the same graph.
"""

import torch


class ImageEncoder(torch.nn.Module):
    """[-1, 1] images -> scaled latents (distribution mode, as Marigold; TAESD latents)."""

    def __init__(self, vae):
        """Wrap the encoder of an AutoencoderKL or AutoencoderTiny."""
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, images):
        """Encode [B, 3, H, W] images in [-1, 1] into [B, C, H / f, W / f] scaled latents."""
        encoded = self.vae.encode(images)
        latent = encoded.latent_dist.mode() if hasattr(encoded, 'latent_dist') else encoded.latents
        return latent * self.scaling_factor


class TextFreeUNet(torch.nn.Module):
    """The U-Net with the empty-prompt embedding held as a constant: (latents, t) -> output."""

    def __init__(self, unet, text):
        """Hold the U-Net and its [1, tokens, dim] empty-prompt embedding (the U-Net's dtype)."""
        super().__init__()
        self.unet = unet
        self.register_buffer('text', text, persistent=False)

    def forward(self, sample, timestep):
        """Predict [B, C, h, w] from [B, 2C, h, w] image and depth latents at a timestep."""
        # A contiguous copy: a stride-0 (expanded) batch takes other attention kernels, whose
        # last bits differ, and process_bag's output must not change with the backend refactor.
        text = self.text.repeat(sample.shape[0], 1, 1)
        return self.unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]


class DepthDecoder(torch.nn.Module):
    """Scaled depth latents -> [B, 1, H, W] relative depth in [0, 1] (channel mean, clipped)."""

    def __init__(self, vae):
        """Wrap the decoder of an AutoencoderKL or AutoencoderTiny."""
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent):
        """Decode [B, C, h, w] scaled latents into [B, 1, h * f, w * f] depth in [0, 1]."""
        decoded = self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]
        return (decoded.mean(dim=1, keepdim=True).clip(-1.0, 1.0) + 1.0) / 2.0


def vae_scale_factor(vae):
    """Return how much smaller the latents are than the image (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


class TorchNetworks:
    """
    The torch backend: the model's own modules, with the GPU speed switches of ModelConfig.

    :param model_config: ModelConfig (channels_last, compile, cuda_graphs)
    """

    name = 'torch'

    def __init__(self, components, device, dtype, model_config):
        """Wrap the loaded modules; on CUDA apply channels-last and torch.compile."""
        text = components.empty_text_embedding.to(device, dtype)
        self.encoder = ImageEncoder(components.vae)
        self.denoiser = TextFreeUNet(components.unet, text)
        self.decoder = DepthDecoder(components.vae)
        self.vae_scale_factor = vae_scale_factor(components.vae)
        self._unet_forward = self.denoiser
        if device.type != 'cuda':
            return
        if model_config.channels_last:
            components.unet.to(memory_format=torch.channels_last)
            components.vae.to(memory_format=torch.channels_last)
        if model_config.compile or model_config.cuda_graphs:
            # 'reduce-overhead' records CUDA graphs per input size: the U-Net is ~770 kernel
            # launches per call, which dominates at small resolutions.
            mode = 'reduce-overhead' if model_config.cuda_graphs else 'max-autotune-no-cudagraphs'
            self._unet_forward = torch.compile(self.denoiser, mode=mode, dynamic=False)

    def encode(self, images):
        """Encode [B, 3, H, W] images in [-1, 1] into scaled latents."""
        return self.encoder(images)

    def unet(self, sample, timestep):
        """Run the U-Net on [B, 2C, h, w] latents at a timestep (0-d tensor)."""
        return self._unet_forward(sample, timestep)

    def decode(self, latent):
        """Decode scaled depth latents into [B, 1, H, W] depth in [0, 1]."""
        return self.decoder(latent)
