"""
Sparse guidance: metric depth completion by steering the diffusion (Marigold-DC).

Viola et al. 2024, "Marigold-DC: Zero-Shot Monocular Depth Completion with Guided
Diffusion".  Instead of fitting one scale and shift to a finished prediction
(:mod:`marigold_model.scale_tracking`), each denoising step previews the clean latent
(the DDIM ``x0``), decodes it, maps it to meters with a learnt scale and shift and takes an
Adam step on the noisy latent (through the U-Net and the decoder) and on scale and shift
against the sparse-point loss; the DDIM step then continues from the updated latent.  The
prediction's shape bends towards the points where the model's prior allows it.

Differences from the public implementation, for noisy sparse input with outliers:

* scale and shift start from the robust global fit (RANSAC, :class:`ScaleTracker` rules,
  looser thresholds first, then the tracker's own) of the first step's preview, not from
  the range of the points, and points far off that fit get no weight in the loss;
* the loss is on the relative residual ``(pred - z) / z`` (L1 + L2 as in the paper, or
  Huber), so near and far points count alike and the learning rates do not depend on units.

No ROS here; the estimator's own pieces (preprocessing, encoder, U-Net, DDIM update,
decoder) do the work, so the results match :meth:`DepthEstimator.estimate` where the
guidance does nothing.
"""

from dataclasses import dataclass, field
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .alignment import AlignmentError, REASON_TOO_FEW_POINTS
from .config import GuidanceConfig
from .estimator import check_frame
from .scale_tracking import ScaleEstimate, ScaleTracker, ScaleTrackerConfig, STATUS_OK

REASON_UNSUPPORTED_SCHEDULER = 'unsupported_scheduler'
REASON_UNSUPPORTED_BACKEND = 'unsupported_backend'


class GuidanceError(AlignmentError):
    """Guidance cannot run on this input ('too_few_points', the global fit's reasons...)."""


@dataclass
class GuidedResult:
    """
    Metric depth of one frame from sparse guidance.

    :param depth: float32 [H, W] depth in METERS at the frame's size (NaN where not positive)
    :param scale: final scale (``depth = scale * relative + shift``)
    :param shift: final shift in meters
    :param global_fit: the robust global fit of the first preview
        (:class:`~marigold_model.scale_tracking.ScaleEstimate`: scale, shift, inlier_ratio,
        residual, n_points): what the unguided pipeline would have applied
    :param inlier_ratio: share of the points within the inlier threshold of the result
    :param residual: RMS relative residual of the result at its inliers
    :param n_points: valid sparse points
    :param relative: float32 [H, W] final relative depth at the frame's size: ``depth`` is
        ``scale * relative + shift`` (so a pipeline can keep relative depth and a scale)
    :param timings: seconds per stage
    :param losses: loss before each guidance update (for diagnostics and plots)
    """

    depth: np.ndarray
    scale: float
    shift: float
    global_fit: object
    inlier_ratio: float
    residual: float
    n_points: int
    relative: np.ndarray
    timings: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)

    def scale_estimate(self, stamp_s=math.nan):
        """
        Return the final scale and shift as a fresh ScaleEstimate for ``relative``.

        :param stamp_s: time of the frame in seconds
        :return: :class:`~marigold_model.scale_tracking.ScaleEstimate` with status ``'ok'``
        """
        return ScaleEstimate(scale=self.scale, shift=self.shift,
                             inlier_ratio=self.inlier_ratio, residual=self.residual,
                             n_points=self.n_points, age_s=0.0, status=STATUS_OK,
                             stamp_s=stamp_s)


def sparse_points(sparse_depth=None, uv=None, values=None, frame_shape=None):
    """
    Normalise sparse input to image-relative coordinates and depths.

    Give either a sparse depth image aligned with the frame (any resolution; NaN or <= 0 is
    no reading) or pixel coordinates ``uv`` (column, row) in the frame with ``values``.

    :param sparse_depth: 2-D sparse depth image in meters, or None
    :param uv: (N, 2) frame pixel coordinates (column, row), or None
    :param values: (N,) depths in meters for ``uv``
    :param frame_shape: (height, width) of the frame (needed with ``uv``)
    :return: (xy float64 (N, 2) in [0, 1] of width and height, depths float64 (N,)),
        invalid readings dropped
    :raises ValueError: both or neither input given, bad shapes
    """
    if (sparse_depth is None) == (uv is None):
        raise ValueError('give either a sparse depth image or uv and values')
    if sparse_depth is not None:
        image = np.asarray(sparse_depth, dtype=np.float64)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim != 2:
            raise ValueError(f'sparse depth must be a 2-D image, got shape {image.shape}')
        with np.errstate(invalid='ignore'):
            rows, cols = np.nonzero(np.isfinite(image) & (image > 0))
        xy = np.stack([(cols + 0.5) / image.shape[1], (rows + 0.5) / image.shape[0]], axis=1)
        return xy, image[rows, cols]
    uv = np.asarray(uv, dtype=np.float64)
    z = np.asarray(values, dtype=np.float64).ravel()
    if uv.ndim != 2 or uv.shape[1] != 2 or uv.shape[0] != z.size:
        raise ValueError(f'uv must be (N, 2) with N = {z.size} values, got {uv.shape}')
    if frame_shape is None:
        raise ValueError('uv needs frame_shape (height, width)')
    height, width = frame_shape[:2]
    xy = (uv + 0.5) / np.array([width, height], dtype=np.float64)
    with np.errstate(invalid='ignore'):
        keep = (np.all(np.isfinite(xy), axis=1) & np.isfinite(z) & (z > 0)
                & np.all((xy >= 0) & (xy <= 1), axis=1))
    return xy[keep], z[keep]


def original_and_noise(scheduler, output, t, sample):
    """Return DDIM's clean-sample preview (Tweedie) and noise estimate, as _ddim_step has them."""
    alpha_t = scheduler.alphas_cumprod[t].to(sample.device, sample.dtype)
    beta_t = 1 - alpha_t
    kind = scheduler.config.prediction_type
    if kind == 'v_prediction':
        return (alpha_t.sqrt() * sample - beta_t.sqrt() * output,
                alpha_t.sqrt() * output + beta_t.sqrt() * sample)
    if kind == 'epsilon':
        return (sample - beta_t.sqrt() * output) / alpha_t.sqrt(), output
    return output, (sample - alpha_t.sqrt() * output) / beta_t.sqrt()


def _relative_loss(config, predicted, target, weights):
    """Weighted mean of the loss on the relative residual ``(predicted - target) / target``."""
    residual = (predicted - target) / target
    if config.loss == 'huber':
        per_point = F.huber_loss(residual, torch.zeros_like(residual), reduction='none',
                                 delta=config.huber_delta)
    else:
        per_point = residual.abs() + residual * residual
    return (weights * per_point).sum() / weights.sum()


class SparseGuidance:
    """
    Guided metric depth for one frame at a time, driving a :class:`DepthEstimator`.

    Uses the estimator's ``_preprocess``, ``encode``, ``networks.unet``, ``_schedule``,
    ``_ddim_step``, ``decode`` and ``resolved_settings`` (the torch backend: gradients flow
    through the U-Net and the decoder); its lock keeps guidance and plain estimates from
    running at once.
    """

    def __init__(self, estimator, config=GuidanceConfig()):
        """
        Bind an estimator and settings.

        :param estimator: a loaded DepthEstimator with a DDIM scheduler
        :param config: GuidanceConfig
        :raises GuidanceError: the scheduler is not closed-form DDIM, or the backend has no
            gradients (onnxruntime)
        """
        if estimator.networks.name != 'torch':
            raise GuidanceError(REASON_UNSUPPORTED_BACKEND,
                                f'sparse guidance needs gradients through the networks: the '
                                f'torch backend, not {estimator.networks.name}')
        if not estimator._closed_form_ddim():
            raise GuidanceError(REASON_UNSUPPORTED_SCHEDULER,
                                f'sparse guidance needs a DDIM scheduler, the model has a '
                                f'{type(estimator.scheduler).__name__}')
        self.estimator = estimator
        self.config = config
        self._fit_config = ScaleTrackerConfig(
            min_points=config.min_points, inlier_threshold_rel=config.inlier_threshold_rel,
            min_inlier_ratio=config.min_inlier_ratio, seed=config.fit_seed)
        self._fallback_config = ScaleTrackerConfig(min_points=config.min_points,
                                                   seed=config.fit_seed)

    def estimate(self, frame, sparse_depth=None, uv=None, values=None, seed=None):
        """
        Metric depth of one frame guided by sparse metric points.

        :param frame: uint8 [H, W, 3] (or grey / float in [0, 1], as the estimator takes)
        :param sparse_depth: sparse depth image in meters aligned with the frame (any
            resolution, NaN / 0 = none), or None when ``uv`` and ``values`` are given
        :param uv: (N, 2) frame pixel coordinates (column, row)
        :param values: (N,) depths in meters at ``uv``
        :param seed: initial-noise seed (default the estimator's inference seed)
        :return: GuidedResult
        :raises GuidanceError: fewer than ``min_points`` points, or the global fit failed
            (its reason: 'degenerate_range', 'low_inlier_ratio', 'flat_fit'...)
        """
        est = self.estimator
        frame = check_frame(frame, est.config.model.max_input_pixels)
        xy, z = sparse_points(sparse_depth, uv, values, frame.shape)
        if z.size < self.config.min_points:
            raise GuidanceError(REASON_TOO_FEW_POINTS,
                                f'{z.size} valid sparse point(s), at least '
                                f'{self.config.min_points} needed')
        seed = est.inference.seed if seed is None else int(seed)
        with est._lock, torch.inference_mode(False), torch.enable_grad():
            return self._run(frame, xy, z, seed)

    def _run(self, frame, xy, z, seed):
        est, cfg = self.estimator, self.config
        timings = {}
        clock = time.perf_counter()
        _, resolution = est.resolved_settings()
        with torch.no_grad():
            image, size = est._preprocess(frame, resolution)
            image_latent = est.encode(image)
        timings['encode'] = time.perf_counter() - clock

        device, dtype = est.device, est.dtype
        grid = torch.from_numpy(xy * 2.0 - 1.0).to(device, torch.float32).view(1, 1, -1, 2)
        target = torch.from_numpy(z).to(device, torch.float32)
        generator = torch.Generator('cpu').manual_seed(seed)
        noise = torch.randn((1,) + tuple(image_latent.shape[1:]), generator=generator,
                            dtype=dtype)
        latent = noise.to(device, torch.float32).requires_grad_(True)
        log_scale = torch.zeros(1, device=device, requires_grad=True)
        shift = torch.zeros(1, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([{'params': [log_scale, shift], 'lr': cfg.affine_lr},
                                      {'params': [latent], 'lr': cfg.latent_lr}])
        timesteps, previous, _ = est._schedule(cfg.denoising_steps, 1.0)
        tensors = [torch.tensor(t, device=device) for t in timesteps]

        def sample_points(latent_x0):
            relative = est.decode(latent_x0.to(dtype))[:, :, :size[0], :size[1]].float()
            return relative, F.grid_sample(relative, grid, mode='bilinear',
                                           padding_mode='border', align_corners=False).view(-1)

        clock = time.perf_counter()
        fit, weights, losses = None, None, []
        for t, prev_t, t_tensor in zip(timesteps, previous, tensors):
            for _ in range(cfg.iterations_per_step):
                model_input = torch.cat([image_latent, latent.to(dtype)], dim=1)
                output = est.networks.unet(model_input, t_tensor).float()
                original, epsilon = original_and_noise(est.scheduler, output, t, latent)
                _, samples = sample_points(original)
                if fit is None:
                    fit, weights = self._global_fit(samples.detach(), target)
                metric = (fit.scale * torch.exp(log_scale) * samples + fit.shift
                          + fit.scale * shift)
                loss = _relative_loss(cfg, metric, target, weights)
                losses.append(float(loss.detach()))
                grads = torch.autograd.grad(loss, [latent, log_scale, shift])
                latent_grad = grads[0]
                if cfg.rescale_gradient:
                    # Marigold-DC: the latent step has the size of the noise estimate.
                    norm = float(torch.linalg.vector_norm(latent_grad))
                    latent_grad = latent_grad * (float(torch.linalg.vector_norm(
                        epsilon.detach())) / max(norm, 1e-12))
                latent.grad, log_scale.grad, shift.grad = latent_grad, grads[1], grads[2]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                latent.copy_(est._ddim_step(output.detach(), t, prev_t, latent))
        timings['guidance'] = time.perf_counter() - clock

        clock = time.perf_counter()
        for _ in range(cfg.refine_iterations):
            # The clean latent alone, through the decoder only: cheap, and the decoder's
            # prior keeps the shape plausible between the points.
            _, samples = sample_points(latent)
            metric = fit.scale * torch.exp(log_scale) * samples + fit.shift + fit.scale * shift
            loss = _relative_loss(cfg, metric, target, weights)
            losses.append(float(loss.detach()))
            latent.grad, log_scale.grad, shift.grad = torch.autograd.grad(
                loss, [latent, log_scale, shift])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        timings['refine'] = time.perf_counter() - clock

        clock = time.perf_counter()
        with torch.no_grad():
            relative, samples = sample_points(latent)
            scale = fit.scale * math.exp(float(log_scale))
            shift_m = fit.shift + fit.scale * float(shift)
            if tuple(relative.shape[2:]) != frame.shape[:2]:
                relative = F.interpolate(relative, frame.shape[:2], mode='bilinear')
            relative = relative[0, 0].cpu().numpy().astype(np.float32)
            error = np.abs((scale * samples.cpu().numpy() + shift_m - z) / z)
        depth = (scale * relative.astype(np.float64) + shift_m).astype(np.float32)
        with np.errstate(invalid='ignore'):
            depth[~(depth > 0)] = np.nan
        inliers = error < cfg.inlier_threshold_rel
        timings['decode'] = time.perf_counter() - clock
        timings['total'] = sum(timings.values())
        return GuidedResult(
            depth=depth, scale=scale, shift=shift_m, global_fit=fit,
            inlier_ratio=float(inliers.mean()),
            residual=float(np.sqrt(np.mean(error[inliers] ** 2))) if inliers.any() else math.nan,
            n_points=int(z.size), relative=relative, timings=timings,
            losses=losses)

    def _global_fit(self, samples, target):
        """Robust global fit of the first preview and the loss weights of its inliers."""
        rel = samples.cpu().numpy().astype(np.float64)
        metric = target.cpu().numpy().astype(np.float64)
        fit = ScaleTracker(self._fit_config).update(rel, metric, 0.0)
        if not fit.usable:
            # The loose fit can fail where the tracker's own rules succeed (RANSAC at a wide
            # threshold may prefer a falling line): what the plain pipeline accepts is never
            # refused here.
            fit = ScaleTracker(self._fallback_config).update(rel, metric, 0.0)
        if not fit.usable:
            raise GuidanceError(fit.reason, f'the global fit of the first preview failed '
                                f'({fit.reason}), no scale to guide from')
        if self.config.robust_weights:
            error = np.abs((fit.scale * rel + fit.shift - metric) / metric)
            weights = (error < self.config.outlier_threshold_rel).astype(np.float32)
        else:
            weights = np.ones(rel.size, dtype=np.float32)
        return fit, torch.from_numpy(weights).to(target.device)
