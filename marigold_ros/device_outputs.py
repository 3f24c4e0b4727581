"""
The per-frame output maths on the model's device: metric depth, uncertainty, cloud points.

The host path (numpy in ``marigold_ros.pipeline`` and ``marigold_model.scale_apply``) does
this on the CPU, which on a GPU machine costs more than the model at small sizes.  Here the
maths stays on the device and each output is copied back once (into pinned memory on CUDA).
On CPU tensors it is the host path to the bit, so the tests need no GPU.  No ROS here; a
locally refined scale estimate takes the host path (:func:`runs_on_device`).  Per frame,
with the estimator's ``DepthResult`` asked for its device tensors (already resized, its
host ``depth`` is what the scale is fitted to)::

    out = metric_outputs(result.device_depth, scale, max_depth, result.device_uncertainty,
                         rays.get(camera_at_depth_size), points_out=cloud_buffer)

``DepthPipeline(device_outputs=...)`` does this; it is on by default for a CUDA estimator.
"""

from collections import OrderedDict
from dataclasses import dataclass

from marigold_model.scale_apply import RefinedScaleEstimate
import numpy as np
import torch

from .geometry import pixel_rays


def _as_float32_scalar(value):
    """Return a Python float that float32 holds exactly (the value numpy's float32 path uses)."""
    return float(np.float32(value))


def metric_depth(relative, scale, shift, max_depth=0.0):
    """
    Metric depth ``scale * rel + shift`` in float32, NaN where invalid (REP 118).

    The rules of ``marigold_model.scale_apply.apply_scale``: depths that are not positive
    (or NaN) and, when max_depth > 0, depths beyond it become NaN.  Multiply and add are
    separate float32 operations, as in numpy, so the result is the host path's to the bit.

    :param relative: [H, W] relative depth tensor
    :param scale: meters per relative unit
    :param shift: meters
    :param max_depth: meters; farther depths become NaN (0: no limit)
    :return: [H, W] float32 tensor on the same device
    """
    metric = relative.float() * _as_float32_scalar(scale)
    metric = metric + _as_float32_scalar(shift)
    nan = torch.tensor(float('nan'), dtype=torch.float32, device=metric.device)
    keep = metric > 0
    if max_depth > 0:
        keep &= ~(metric > _as_float32_scalar(max_depth))
    return torch.where(keep, metric, nan)


def metric_uncertainty(uncertainty, scale, metric):
    """Return the spread in meters, ``scale * spread`` (shift cancels), NaN where depth is."""
    spread = uncertainty.float() * _as_float32_scalar(scale)
    return torch.where(torch.isnan(metric), metric, spread)


def cloud_points(metric, rays):
    """
    Organized points (x, y, z, spare word) of a metric depth image, as the host cloud.

    ``x = rx * z``, ``y = ry * z`` with the per-pixel rays; pixels whose depth is not
    positive or whose ray failed to undistort are NaN in all three coordinates.  The fourth
    float32 word is zero, left for the packed 0x00RRGGBB colour, so the host buffer has the
    PointCloud2 layout (point_step 16) and needs only the colours written into it.

    :param rays: (rx, ry, valid) [H, W] tensors from :meth:`DeviceRays.get`
    :return: [H, W, 4] float32 tensor
    """
    rx, ry, ray_ok = rays
    if tuple(rx.shape) != tuple(metric.shape):
        raise ValueError(f'rays are {tuple(rx.shape)} but the depth is {tuple(metric.shape)}; '
                         'take the rays of the camera scaled to the depth resolution')
    nan = torch.tensor(float('nan'), dtype=torch.float32, device=metric.device)
    z = torch.where((metric > 0) & ray_ok, metric, nan)
    return torch.stack([rx * z, ry * z, z, torch.zeros_like(z)], dim=-1)


class DeviceRays:
    """
    Per-pixel unit-depth rays (rx, ry) of each camera, computed once and kept on a device.

    Built from ``marigold_ros.geometry.pixel_rays`` (distortion undone the same way), so the
    device cloud is the host cloud; a camera is its K, D, model and size, so a node with
    several cameras keeps one entry each (the oldest dropped beyond ``max_cameras``).

    :param device: torch device of the depth tensors
    :param max_cameras: entries kept
    """

    def __init__(self, device, max_cameras=16):
        """Start with no cameras."""
        self.device = torch.device(device)
        self.max_cameras = max_cameras
        self._rays = OrderedDict()

    def get(self, camera):
        """
        Return the rays of a camera model of the depth image.

        :param camera: marigold_ros.geometry.CameraModel at the depth resolution (e.g.
            ``scale_camera(model, width, height)``); binning / ROI are folded in here
        :return: (rx, ry, valid): float32, float32 and bool [H, W] tensors on the device
        """
        eff = camera.effective()
        coeffs = eff.distortion_coefficients()
        key = (eff.height, eff.width, tuple(eff.K.ravel()), tuple(coeffs),
               eff.distortion_model if coeffs.size else '')
        rays = self._rays.get(key)
        if rays is None:
            rx, ry, valid = pixel_rays(eff.height, eff.width, eff.K, coeffs,
                                       eff.distortion_model)
            rays = tuple(torch.from_numpy(np.array(a)).to(self.device) for a in (rx, ry, valid))
            self._rays[key] = rays
            while len(self._rays) > self.max_cameras:
                self._rays.popitem(last=False)
        else:
            self._rays.move_to_end(key)
        return rays


def to_host(tensors, outs=None):
    """
    Copy device tensors (or None) back as numpy arrays, each once, waiting once for all.

    On CUDA each goes into a page-locked buffer (torch's caching host allocator reuses them
    between frames) with an asynchronous copy; on the CPU there is no copy.  An entry of
    ``outs`` (a writable numpy array of the tensor's shape and dtype, e.g. a view of a
    message's buffer) receives its tensor instead, and is returned.
    """
    buffers = []
    waits = set()
    for tensor, out in zip(tensors, outs or [None] * len(tensors)):
        if tensor is None:
            buffers.append(None)
        elif out is not None:
            host = torch.from_numpy(out)
            if host.shape != tensor.shape or host.dtype != tensor.dtype:
                raise ValueError(f'output buffer is {tuple(host.shape)} {host.dtype}, the '
                                 f'tensor {tuple(tensor.shape)} {tensor.dtype}')
            host.copy_(tensor, non_blocking=tensor.device.type == 'cuda')
            buffers.append(host)
            if tensor.device.type == 'cuda':
                waits.add(tensor.device)
        elif tensor.device.type == 'cuda':
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            buffers.append(host)
            waits.add(tensor.device)
        else:
            buffers.append(tensor.detach().contiguous())
    for device in waits:
        torch.cuda.current_stream(device).synchronize()
    return [None if b is None else b.numpy() for b in buffers]


def runs_on_device(estimate):
    """Tell whether an estimate runs here: not a locally refined one with points (scipy)."""
    return not (isinstance(estimate, RefinedScaleEstimate) and estimate.sparse_uv is not None)


@dataclass
class MetricOutputs:
    """
    One frame's metric outputs, on the host.

    :param metric: [H, W] float32 meters, NaN where invalid
    :param uncertainty: [H, W] float32 meters or None
    :param points: [H, W, 4] float32 x y z and a zero word for the colour, or None
    """

    metric: np.ndarray
    uncertainty: object
    points: object


def metric_outputs(relative, estimate, max_depth=0.0, uncertainty=None, rays=None,
                   points_out=None):
    """
    Metric depth, its uncertainty and the cloud points of one frame, copied back once each.

    :param max_depth: meters; farther depths become NaN (0: no limit)
    :param rays: (rx, ry, valid) from :meth:`DeviceRays.get`, or None for no cloud
    :param points_out: writable float32 [H, W, 4] array receiving the points (the cloud
        message's own buffer: ``np.frombuffer(data, '<f4').reshape(H, W, 4)`` of its
        ``array('B')``), or None for a buffer of this module's
    :raises ValueError: no usable estimate, or a refined one (host path only)
    """
    if estimate is None or not estimate.usable:
        raise ValueError('no usable metric scale: stay relative (status '
                         f'{getattr(estimate, "status", None)!r})')
    if not runs_on_device(estimate):
        raise ValueError('a locally refined scale estimate is applied on the host '
                         '(marigold_model.scale_apply.apply_scale)')
    metric = metric_depth(relative, estimate.scale, estimate.shift, max_depth)
    spread = None if uncertainty is None else metric_uncertainty(uncertainty, estimate.scale,
                                                                 metric)
    points = None if rays is None else cloud_points(metric, rays)
    host = to_host([metric, spread, points], [None, None, points_out])
    return MetricOutputs(*host)
