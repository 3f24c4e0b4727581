"""
DepthEstimator: RGB frames in, Marigold relative depth (and uncertainty) out.

The maths is the one of diffusers' ``MarigoldDepthPipeline`` (same preprocessing, latents,
DDIM update, decoding and ensembling; a test checks equality to 1e-5 in fp32), with the
per-call overhead dropped: no text encoder, cached timesteps, the text embedding expanded
(not copied) per batch, no progress bars, frames of several cameras and sizes in one call,
grouped by processing size. The three network calls go through a backend object
(:mod:`marigold_model.networks`): the torch modules, or ONNX Runtime sessions of an exported
model (``backend: onnxruntime``), with the same loop.
"""

from dataclasses import dataclass, field
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from .config import EstimatorConfig, resolve_processing_resolution
from .ensemble import ensemble_depth
from .loading import load_components
from .networks import TorchNetworks

FALLBACK_STEPS = 4
FALLBACK_RESOLUTION = 768


class EstimatorOutOfMemory(RuntimeError):
    """The device ran out of memory; the message says what to lower."""


@dataclass
class DepthResult:
    """
    The estimate for one frame.

    :param depth: float32 [H, W] relative (affine-invariant) depth in [0, 1], NOT meters
    :param uncertainty: float32 [H, W] ensemble spread in the same units, or None
    :param timings: seconds per stage for the call that produced this frame
    :param processing_size: (height, width) the model worked at
    :param latent: [E, C, h, w] final depth latents of the ensemble members (warm start)
    :param device_depth: ``depth`` as a float32 [H, W] tensor on the model's device, kept
        only when asked for (``estimate(..., device_tensors=True)``), so the outputs can be
        computed there (marigold_ros.device_outputs); None otherwise
    :param device_uncertainty: ``uncertainty`` likewise, or None
    """

    depth: np.ndarray
    uncertainty: object
    timings: dict = field(default_factory=dict)
    processing_size: tuple = (0, 0)
    latent: object = None
    device_depth: object = None
    device_uncertainty: object = None


def resolve_device(name):
    """Map 'auto', 'cpu', 'cuda' or 'cuda:N' to a torch.device, refusing what is not there."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'device {name!r} requested but CUDA is not available here; '
                         "use device 'cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(name, device):
    """Map a dtype setting to a torch dtype: fp16 on CUDA and fp32 on CPU for 'auto'."""
    if name == 'auto':
        return torch.float16 if device.type == 'cuda' else torch.float32
    return getattr(torch, name)


def check_frame(frame, max_pixels):
    """
    Validate one input frame and return it as an [H, W, 3] array.

    :param frame: uint8 [H, W, 3] or [H, W] array, or float in [0, 1]
    :return: the frame, with a grey image expanded to 3 channels
    """
    if not isinstance(frame, np.ndarray):
        raise ValueError(f'frame must be a numpy array, got {type(frame).__name__}')
    if frame.ndim == 2:
        frame = frame[:, :, None].repeat(3, axis=2)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f'frame must be [H, W, 3] RGB or [H, W] grey, got shape {frame.shape}')
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f'frame is empty: shape {frame.shape}')
    if frame.shape[0] * frame.shape[1] > max_pixels:
        raise ValueError(f'frame of {frame.shape[1]}x{frame.shape[0]} exceeds the limit of '
                         f'{max_pixels} pixels (max_input_pixels)')
    if frame.dtype == np.uint8:
        return frame
    if frame.dtype not in (np.float32, np.float64):
        raise ValueError(f'frame dtype {frame.dtype} unsupported; use uint8 or float in [0, 1]')
    if not np.isfinite(frame).all():
        raise ValueError('frame contains NaN or inf')
    if frame.min() < 0.0 or frame.max() > 1.0:
        raise ValueError('float frame values must lie within [0, 1]')
    return frame


def check_call(frames, keys, latents, max_pixels):
    """
    Validate the arguments of an estimate call: one frame or a list, keys and latents per frame.

    :return: (single frame given, frames, keys, latents), the last three as lists
    """
    single = isinstance(frames, np.ndarray)
    frames = [frames] if single else list(frames)
    if not frames:
        raise ValueError('no frames given')
    frames = [check_frame(f, max_pixels) for f in frames]
    keys = list(keys) if keys is not None else [None] * len(frames)
    latents = list(latents) if latents is not None else [None] * len(frames)
    if len(keys) != len(frames) or len(latents) != len(frames):
        raise ValueError('keys and latents must have one entry per frame')
    return single, frames, keys, latents


def processing_size(height, width, resolution):
    """
    Size the model works at: longest side = resolution, as diffusers computes it.

    :param resolution: longest side in pixels, or None for the input size (what
        :func:`~marigold_model.config.resolve_processing_resolution` returns)
    :return: (height, width)
    """
    if not resolution:
        return height, width
    longest = max(height, width)
    size = (height * resolution // longest, width * resolution // longest)
    if min(size) == 0:
        raise ValueError(f'extreme aspect ratio {width}x{height} at resolution {resolution}')
    return size


def _step_noise_generator(seed, member):
    """Return the CPU generator of the noise a stochastic scheduler (LCM) adds between steps."""
    # Seeded from the seed and the member only, so a frame's result never depends on the
    # other frames of its batch or on the batch size.
    state = np.random.SeedSequence([seed, member]).generate_state(2, np.uint32)
    return torch.Generator('cpu').manual_seed(int(state[0]) << 32 | int(state[1]))


class DepthEstimator:
    """
    Marigold depth for batches of RGB frames.

    Not thread-safe for concurrent ``estimate`` calls (a lock serialises them); settings can
    be changed from another thread with :meth:`set_inference`, taking effect on the next call.
    """

    def __init__(self, config=EstimatorConfig(), components=None):
        """Load the model, or take already loaded MarigoldComponents (tests, trainer)."""
        self.config = config
        onnx = config.model.backend == 'onnxruntime'
        if onnx:
            # The loop runs on CPU tensors in float32; the sessions run where their execution
            # providers put them, in the dtype the model was exported in.
            self.device, self.dtype = torch.device('cpu'), torch.float32
        else:
            self.device = resolve_device(config.model.device)
            self.dtype = resolve_dtype(config.model.dtype, self.device)
        if components is None and onnx:
            from .onnx_backend import load_onnx_components
            components = load_onnx_components(config.model)
        elif components is None:
            tiny = config.model.tiny_vae if config.model.vae == 'tiny' else None
            components = load_components(config.model.model, self.device, self.dtype, tiny)
        self.components = components
        # The torch modules (None with ONNX Runtime): tests and tools look at them.
        self.unet = getattr(components, 'unet', None)
        self.vae = getattr(components, 'vae', None)
        self.scheduler = components.scheduler
        self.networks = getattr(components, 'networks', None) or TorchNetworks(
            components, self.device, self.dtype, config.model)
        self.vae_scale_factor = self.networks.vae_scale_factor
        self._timestep_cache = {}
        self._warm_latents = {}
        self._lock = threading.Lock()
        self._check_warm_start(config.inference)

    # ---- settings -------------------------------------------------------------------------

    @property
    def inference(self):
        """Return the InferenceConfig used for the next call."""
        return self.config.inference

    def set_inference(self, inference):
        """Replace the per-call InferenceConfig; safe while another thread estimates."""
        self._check_warm_start(inference)
        self.config = EstimatorConfig(self.config.model, inference)

    def _check_warm_start(self, inference):
        """Refuse warm start for schedulers other than DDIM (their steps use own timesteps)."""
        if inference.warm_start_strength > 0 and not self._closed_form_ddim():
            raise ValueError(
                f'warm_start_strength needs a DDIM scheduler; the model has a '
                f'{type(self.scheduler).__name__}, whose steps only take its own timesteps: '
                'set warm_start_strength to 0')

    @property
    def default_steps(self):
        """Return the denoising steps the model was published with."""
        return self.components.pipeline_config.get('default_denoising_steps') or FALLBACK_STEPS

    @property
    def default_resolution(self):
        """Return the processing resolution the model was published with."""
        value = self.components.pipeline_config.get('default_processing_resolution')
        return value or FALLBACK_RESOLUTION

    def resolved_settings(self, inference=None):
        """
        Resolve steps and processing resolution, applying the model defaults.

        :return: (steps, resolution): resolution as
            :func:`~marigold_model.config.resolve_processing_resolution` gives it, pixels of
            the longer side or None for the input size
        """
        inference = inference or self.config.inference
        steps = inference.denoising_steps or self.default_steps
        return steps, resolve_processing_resolution(inference.processing_resolution,
                                                    self.default_resolution)

    def reset_warm_start(self, key=None):
        """Forget the video warm-start latents of one stream key (None: all)."""
        if key is None:
            self._warm_latents.clear()
        else:
            self._warm_latents.pop(key, None)

    def _sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    # ---- diffusion pieces ----------------------------------------------------------------

    def _schedule(self, steps, strength):
        """
        Timesteps and their predecessors for ``steps`` DDIM steps from ``strength``.

        Full strength reproduces the scheduler's own (trailing) timesteps; a lower strength
        spreads the same number of steps over the first part of the schedule (warm start).
        """
        key = (steps, strength)
        cached = self._timestep_cache.get(key)
        if cached is not None:
            return cached
        if strength >= 1.0:
            # The scheduler's own steps and predecessors, as diffusers' DDIM computes them.
            self.scheduler.set_timesteps(steps, device='cpu')
            timesteps = [int(t) for t in self.scheduler.timesteps]
            span = self.scheduler.config.num_train_timesteps
            previous = [t - span // steps for t in timesteps]
        else:
            # At least one timestep per step, and each step ends where the next begins, the
            # last at the final alpha: a span shorter than the steps gave repeated and
            # negative timesteps (alphas_cumprod[-1]: the noisiest entry).
            span = max(int(round(strength * self.scheduler.config.num_train_timesteps)), steps)
            timesteps = [int(t) for t in np.round(np.arange(span, 0, -span / steps)) - 1]
            previous = timesteps[1:] + [-1]
        cached = (timesteps, previous,
                  [torch.tensor(t, device=self.device) for t in timesteps])
        self._timestep_cache[key] = cached
        return cached

    def _closed_form_ddim(self):
        sched = self.scheduler
        return (type(sched).__name__ == 'DDIMScheduler' and not sched.config.clip_sample
                and not sched.config.thresholding and sched.config.prediction_type in (
                    'v_prediction', 'epsilon', 'sample'))

    def _ddim_step(self, output, t, prev_t, sample):
        """One deterministic DDIM update (eta = 0) with the scheduler's own coefficients."""
        sched = self.scheduler
        alpha_t = sched.alphas_cumprod[t]
        alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        beta_t = 1 - alpha_t
        kind = sched.config.prediction_type
        if kind == 'v_prediction':
            original = (alpha_t ** 0.5) * sample - (beta_t ** 0.5) * output
            epsilon = (alpha_t ** 0.5) * output + (beta_t ** 0.5) * sample
        elif kind == 'epsilon':
            original = (sample - beta_t ** 0.5 * output) / alpha_t ** 0.5
            epsilon = output
        else:
            original = output
            epsilon = (sample - alpha_t ** 0.5 * original) / beta_t ** 0.5
        return alpha_prev ** 0.5 * original + (1 - alpha_prev) ** 0.5 * epsilon

    def _denoise(self, image_latent, latent, steps, strength, generators):
        timesteps, previous, tensors = self._schedule(steps, strength)
        closed_form = self._closed_form_ddim()
        if not closed_form:
            self.scheduler.set_timesteps(steps, device=self.device)
        for t, prev_t, t_tensor in zip(timesteps, previous, tensors):
            model_input = torch.cat([image_latent, latent], dim=1)
            output = self.networks.unet(model_input, t_tensor)
            if closed_form:
                latent = self._ddim_step(output, t, prev_t, latent)
            else:
                latent = self.scheduler.step(output, t_tensor, latent,
                                             generator=generators).prev_sample
        return latent

    def encode(self, images):
        """Encode [B, 3, H, W] images in [-1, 1] into scaled latents (distribution mode)."""
        return self.networks.encode(images)

    def decode(self, latent):
        """Decode scaled depth latents into [B, 1, H, W] relative depth in [0, 1]."""
        return self.networks.decode(latent)

    # ---- the call ------------------------------------------------------------------------

    def _preprocess(self, frame, resolution):
        """uint8 [H, W, 3] -> padded [1, 3, PH, PW] in [-1, 1] on the device."""
        tensor = torch.from_numpy(np.ascontiguousarray(frame).transpose(2, 0, 1)[None])
        # float32 until the resize: antialiased resizing has no float16 / bfloat16 kernel on
        # the CPU (and the image is small next to what the model does in self.dtype).
        tensor = tensor.to(self.device, torch.float32)
        if frame.dtype == np.uint8:
            tensor = tensor / 255
        tensor = tensor * 2.0 - 1.0
        size = processing_size(frame.shape[0], frame.shape[1], resolution)
        if size != tuple(frame.shape[:2]):
            tensor = F.interpolate(tensor, size, mode='bilinear', antialias=True)
        tensor = tensor.to(self.dtype)
        pad_h, pad_w = -size[0] % self.vae_scale_factor, -size[1] % self.vae_scale_factor
        tensor = F.pad(tensor, (0, pad_w, 0, pad_h), mode='replicate')
        return tensor, size

    def _initial_latent(self, shape, seed, key, strength):
        """Noise for one frame (seeded per frame, so batching never changes a result)."""
        generator = torch.Generator('cpu').manual_seed(seed)
        noise = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        previous = self._warm_latents.get(key) if key is not None else None
        if strength >= 1.0 or previous is None or previous.shape != noise.shape:
            return noise, 1.0
        alpha = self.scheduler.alphas_cumprod[max(int(round(strength * len(
            self.scheduler.alphas_cumprod))) - 1, 0)].to(self.device, self.dtype)
        return alpha.sqrt() * previous + (1 - alpha).sqrt() * noise, strength

    def estimate(self, frames, keys=None, latents=None, device_tensors=False):
        """
        Estimate relative depth for one frame or a list of frames (any sizes).

        :param frames: uint8 [H, W, 3] array or a list of them (e.g. one per camera)
        :param keys: optional stream key per frame for video warm start
        :param latents: optional initial latents per frame ([E, C, h, w]) replacing the noise
        :param device_tensors: also keep each result's depth and uncertainty on the device
            (``DepthResult.device_depth``); off by default, as results kept by a caller must
            not hold device memory
        :return: DepthResult, or a list of them for a list input
        """
        single, frames, keys, latents = check_call(frames, keys, latents,
                                                   self.config.model.max_input_pixels)
        # One snapshot of the settings for the whole call: set_inference may run meanwhile.
        inference = self.config.inference
        out_of_memory = None
        try:
            with self._lock, torch.inference_mode():
                results = self._estimate(frames, keys, latents, inference)
        except torch.cuda.OutOfMemoryError as error:
            # Only the text is kept: the traceback holds the frames of the failed call and
            # their tensors, which the cache cannot release while it lives.
            text = str(error).strip()
            out_of_memory = text.splitlines()[0] if text else ''
        if not device_tensors and out_of_memory is None:
            for result in results:
                result.device_depth = result.device_uncertainty = None
        if out_of_memory is not None:
            torch.cuda.empty_cache()
            steps, resolution = self.resolved_settings(inference)
            raise EstimatorOutOfMemory(
                f'{self.device} ran out of memory at processing resolution '
                f'{resolution or "input size"} with '
                f'ensemble {inference.ensemble_size} and batch '
                f'{inference.batch_size}: lower processing_resolution, ensemble_size'
                " or batch_size, or use the tiny VAE (vae: 'tiny')"
                + (f' ({out_of_memory})' if out_of_memory else ''))
        return results[0] if single else results

    def _estimate(self, frames, keys, latents, inference):
        steps, resolution = self.resolved_settings(inference)
        results = [None] * len(frames)
        groups = {}
        clock = time.perf_counter()
        prepared = []
        for index, frame in enumerate(frames):
            tensor, size = self._preprocess(frame, resolution)
            prepared.append((tensor, size))
            groups.setdefault(tuple(tensor.shape[2:]), []).append(index)
        self._sync()
        shared = {'preprocess': time.perf_counter() - clock}
        for indices in groups.values():
            self._estimate_group(frames, indices, prepared, keys, latents, inference, steps,
                                 results, shared)
        return results

    def _estimate_group(self, frames, indices, prepared, keys, latents, inference, steps,
                        results, shared):
        members, batch = inference.ensemble_size, inference.batch_size
        timings = dict(shared)
        clock = time.perf_counter()
        images = torch.cat([prepared[i][0] for i in indices])
        image_latent = torch.cat([self.encode(images[i:i + batch])
                                  for i in range(0, images.shape[0], batch)])
        image_latent = image_latent.repeat_interleave(members, dim=0)
        self._sync()
        timings['encode'] = time.perf_counter() - clock

        clock = time.perf_counter()
        starts, strengths = [], []
        shape = (members,) + tuple(image_latent.shape[1:])
        for i in indices:
            if latents[i] is not None:
                starts.append(latents[i].to(self.device, self.dtype))
                strengths.append(1.0)
                continue
            start, strength = self._initial_latent(shape, inference.seed, keys[i],
                                                   inference.warm_start_strength or 1.0)
            starts.append(start)
            strengths.append(strength)
        latent = torch.empty_like(image_latent)
        stochastic = not self._closed_form_ddim()  # only such schedulers draw step noise
        # Warm-started frames run a shortened schedule; frames without a previous latent run
        # the full one, so rows are denoised per strength.
        for strength in sorted(set(strengths)):
            rows = torch.cat([torch.arange(p * members, (p + 1) * members)
                              for p, s in enumerate(strengths) if s == strength])
            chosen = torch.cat([starts[p] for p, s in enumerate(strengths) if s == strength])
            for i in range(0, rows.numel(), batch):
                part = rows[i:i + batch]
                generators = [_step_noise_generator(inference.seed, int(row) % members)
                              for row in part] if stochastic else None
                part = part.to(self.device)
                latent[part] = self._denoise(image_latent[part], chosen[i:i + batch], steps,
                                             strength, generators)
        self._sync()
        timings['unet'] = time.perf_counter() - clock
        timings['unet_per_step'] = timings['unet'] / steps

        clock = time.perf_counter()
        decoded = torch.cat([self.decode(latent[i:i + batch])
                             for i in range(0, latent.shape[0], batch)])
        self._sync()
        timings['decode'] = time.perf_counter() - clock

        for position, index in enumerate(indices):
            rows = slice(position * members, (position + 1) * members)
            member_latents = latent[rows].clone()
            if keys[index] is not None:
                self._warm_latents[keys[index]] = member_latents
            results[index] = self._finish(frames[index], prepared[index][1], decoded[rows],
                                          inference, dict(timings))
            # A copy on the CPU: results kept by the caller (a video's worth) must not hold
            # device memory; the warm start keeps its own device copy.
            results[index].latent = member_latents.cpu()

    def _finish(self, frame, size, decoded, inference, timings):
        clock = time.perf_counter()
        prediction = decoded[:, :, :size[0], :size[1]]
        uncertainty = None
        if prediction.shape[0] > 1:
            prediction, uncertainty = ensemble_depth(
                prediction, True, inference.ensemble_regularizer, inference.ensemble_max_iter,
                inference.ensemble_tol, inference.ensemble_max_res)
        timings['ensemble'] = time.perf_counter() - clock
        clock = time.perf_counter()
        if inference.match_input_resolution and tuple(prediction.shape[2:]) != frame.shape[:2]:
            prediction = F.interpolate(prediction, frame.shape[:2], mode='bilinear')
            if uncertainty is not None:
                uncertainty = F.interpolate(uncertainty, frame.shape[:2], mode='bilinear')
        device_depth = prediction[0, 0].float()
        device_uncertainty = None if uncertainty is None else uncertainty[0, 0].float()
        depth = device_depth.cpu().numpy()
        if uncertainty is not None:
            uncertainty = device_uncertainty.cpu().numpy()
        timings['postprocess'] = time.perf_counter() - clock
        timings['total'] = sum(v for k, v in timings.items() if k != 'unet_per_step')
        return DepthResult(depth, uncertainty, timings, tuple(size),
                           device_depth=device_depth, device_uncertainty=device_uncertainty)
