"""
Camera geometry: CameraInfo model, scaling, unprojection, projection and transforms.

Pixel convention: integer pixel coordinates are pixel centres (OpenCV / ROS); pixel ``u``
covers ``[u - 0.5, u + 0.5)``.

Resizing convention (:func:`scale_camera`): the estimator resizes with bilinear
interpolation and ``align_corners=False`` (torch ``F.interpolate``, PIL), which maps output
pixel centre ``u'`` to input coordinate ``(u' + 0.5) / s - 0.5``.  The intrinsics are scaled
the same way, ``cx' = (cx + 0.5) * sx - 0.5`` (and ``fx' = fx * sx``), so a ray through an
output pixel is the ray through the input point it was interpolated from.  image_pipeline's
resize node uses ``cx' = cx * sx``, which differs by ``0.5 * (1 - sx)`` output pixels
(0.25 px at half size): small, but a systematic shift of the whole cloud.  Hardware binning
(an average over ``b x b`` raw pixels) is the same operation with ``s = 1 / b``;
image_geometry uses ``cx / b`` there (0.25 px different at b = 2).

Binning and ROI (sensor_msgs/CameraInfo): K, P, width and height describe the full-resolution
unbinned sensor; the published image is the ROI (in full-resolution coordinates) binned by
``binning_x/y``.  :meth:`CameraModel.effective` folds ROI and binning into K and P and sets
width/height to the real image size, binning to 0 and the ROI to zero.  Every model returned
by :func:`scale_camera` is in that folded form, so a consumer using depth/camera_info with
the published depth image gets correct rays whether or not it understands binning / ROI.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

from marigold_model.errors import ReasonError
import numpy as np
from sensor_msgs.msg import CameraInfo
from sensor_msgs.msg import RegionOfInterest
from std_msgs.msg import Header

from .distortion import beyond_monotonic, distort_normalized, distorts, undistort_normalized

#: Distortion models understood here and their number of coefficients (ROS order: plumb_bob
#: k1 k2 p1 p2 k3; rational_polynomial k1 k2 p1 p2 k3 k4 k5 k6; equidistant k1 k2 k3 k4).
DISTORTION_MODELS = {'plumb_bob': 5, 'rational_polynomial': 8, 'equidistant': 4}

#: Points closer than this (meters, along the optical axis) are not projected.
MIN_DEPTH = 1e-6


#: Limits of :meth:`CameraModel.implausibilities`: |skew| / fx, the fx/fy ratio (and its
#: inverse), and |distortion coefficient| (rational polynomial terms reach tens).
PLAUSIBLE_SKEW = 0.1
PLAUSIBLE_FOCAL_RATIO = 2.0
PLAUSIBLE_DISTORTION = 100.0


class CalibrationError(ReasonError):
    """
    A camera calibration that cannot be used.

    :param reason: short key: 'bad_size', 'uncalibrated', 'bad_focal_length',
        'bad_principal_point', 'bad_distortion', 'unknown_distortion_model',
        'bad_projection', 'bad_roi', 'bad_binning'.
    """


class Roi(NamedTuple):
    """Region of interest in full-resolution unbinned pixels (all zero = full image)."""

    x_offset: int = 0
    y_offset: int = 0
    width: int = 0
    height: int = 0
    do_rectify: bool = False


def _frozen_array(value, shape):
    arr = np.array(value, dtype=np.float64).reshape(shape)
    arr.setflags(write=False)
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class CameraModel:
    """
    Pinhole camera with optional lens distortion (the content of a CameraInfo).

    Arrays are stored as read-only float64.  Construction validates the calibration and
    raises :class:`CalibrationError`.  An all-zero (or missing) P is replaced by ``[K | 0]``
    because many drivers leave it empty.

    :param width: full-resolution image width in pixels.
    :param height: full-resolution image height in pixels.
    :param K: 3x3 intrinsic matrix (9 values accepted).
    :param D: distortion coefficients in ROS order (may be empty).
    :param distortion_model: 'plumb_bob', 'rational_polynomial', 'equidistant' or ''.
    :param P: 3x4 projection matrix of the rectified image (12 values accepted) or None.
    :param R: 3x3 rectification rotation or None (identity).
    :param binning_x: horizontal binning (0 and 1 both mean none).
    :param binning_y: vertical binning (0 and 1 both mean none).
    :param roi: :class:`Roi` in full-resolution coordinates.
    :param frame_id: optical frame of the camera.
    """

    width: int
    height: int
    K: np.ndarray
    D: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    distortion_model: str = ''
    P: np.ndarray = None
    R: np.ndarray = None
    binning_x: int = 0
    binning_y: int = 0
    roi: Roi = Roi()
    frame_id: str = ''

    def __post_init__(self):
        """Normalise the arrays and validate the calibration."""
        set_ = functools.partial(object.__setattr__, self)
        set_('width', int(self.width))
        set_('height', int(self.height))
        set_('binning_x', int(self.binning_x))
        set_('binning_y', int(self.binning_y))
        roi = tuple(self.roi) + (False,) * (5 - len(tuple(self.roi)))
        set_('roi', Roi(*(int(v) for v in roi[:4]), bool(roi[4])))
        set_('distortion_model', str(self.distortion_model).strip())
        set_('K', _frozen_array(self.K, (3, 3)))
        set_('D', _frozen_array(np.asarray(self.D, dtype=np.float64).ravel(), (-1,)))
        projection = None if self.P is None else np.asarray(self.P, np.float64).reshape(3, 4)
        if projection is None or not np.any(projection):
            projection = np.hstack([self.K, np.zeros((3, 1))])
        set_('P', _frozen_array(projection, (3, 4)))
        set_('R', _frozen_array(np.eye(3) if self.R is None or not np.any(self.R)
                                else self.R, (3, 3)))
        self._validate()

    def _validate(self):
        if self.width <= 0 or self.height <= 0:
            raise CalibrationError(
                'bad_size', f'camera size must be positive, got {self.width}x{self.height}')
        if not np.any(self.K):
            raise CalibrationError('uncalibrated', 'camera K is all zeros (uncalibrated)')
        fx, fy = self.K[0, 0], self.K[1, 1]
        if not (math.isfinite(fx) and math.isfinite(fy) and fx > 0 and fy > 0):
            raise CalibrationError(
                'bad_focal_length', f'focal lengths must be finite and > 0, got fx={fx} '
                f'fy={fy}')
        if not np.all(np.isfinite(self.K)) or self.K[2, 2] != 1.0 or np.any(self.K[2, :2]) \
                or self.K[1, 0] != 0.0:
            raise CalibrationError(
                'bad_principal_point', f'K must be finite upper triangular with K[2,2] = 1, '
                f'got {self.K.tolist()}')
        if not np.all(np.isfinite(self.P)) or self.P[0, 0] <= 0 or self.P[1, 1] <= 0:
            raise CalibrationError('bad_projection', f'invalid P {self.P.tolist()}')
        if not np.all(np.isfinite(self.D)):
            raise CalibrationError('bad_distortion', f'non-finite D {self.D.tolist()}')
        if np.any(self.D):
            needed = DISTORTION_MODELS.get(self.distortion_model)
            if needed is None:
                raise CalibrationError(
                    'unknown_distortion_model', f'distortion model '
                    f'{self.distortion_model!r} with non-zero D is not supported; supported: '
                    + ', '.join(DISTORTION_MODELS))
            if np.any(self.D[needed:]):
                raise CalibrationError(
                    'bad_distortion', f'{self.distortion_model} takes {needed} coefficients, '
                    f'got non-zero D[{needed}:] in {self.D.tolist()}')
        if self.binning_x < 0 or self.binning_y < 0:
            raise CalibrationError(
                'bad_binning', f'binning must be >= 0, got {self.binning_x}, {self.binning_y}')
        if self.roi_active:
            roi = self.roi
            if roi.x_offset < 0 or roi.y_offset < 0 or roi.x_offset + roi.width > self.width \
                    or roi.y_offset + roi.height > self.height:
                raise CalibrationError(
                    'bad_roi', f'ROI {tuple(roi)} does not fit in {self.width}x{self.height}')
        bx, by = max(1, self.binning_x), max(1, self.binning_y)
        full_w = self.roi.width if self.roi_active else self.width
        full_h = self.roi.height if self.roi_active else self.height
        if full_w // bx == 0 or full_h // by == 0:
            raise CalibrationError(
                'bad_binning', f'binning {bx}x{by} leaves no pixels of {full_w}x{full_h}')

    def implausibilities(self):
        """
        List what looks wrong in a calibration that is still usable (warn, don't refuse).

        Huge skew, focal lengths far apart, a principal point outside the image or absurd
        distortion coefficients usually mean a wrong or hand-typed camera_info.

        :return: list of sentences, empty when the calibration looks plausible
        """
        problems = []
        fx, fy = self.fx, self.fy
        skew = float(self.K[0, 1])
        if abs(skew) > PLAUSIBLE_SKEW * fx:
            problems.append(f'skew K[0,1]={skew:g} is {abs(skew) / fx:.2g} of fx={fx:g} '
                            f'(real cameras: ~0)')
        ratio = fx / fy
        if not 1.0 / PLAUSIBLE_FOCAL_RATIO <= ratio <= PLAUSIBLE_FOCAL_RATIO:
            problems.append(f'fx/fy = {fx:g}/{fy:g} = {ratio:.3g} (square pixels: ~1)')
        if not (0.0 <= self.cx <= self.width and 0.0 <= self.cy <= self.height):
            problems.append(f'principal point ({self.cx:g}, {self.cy:g}) is outside the '
                            f'{self.width}x{self.height} image')
        if self.D.size and float(np.max(np.abs(self.D))) > PLAUSIBLE_DISTORTION:
            problems.append(f'distortion D={self.D.tolist()} has |coefficients| above '
                            f'{PLAUSIBLE_DISTORTION:g}')
        return problems

    # ------------------------------------------------------------------ properties

    @property
    def fx(self):
        """Focal length in x (pixels)."""
        return float(self.K[0, 0])

    @property
    def fy(self):
        """Focal length in y (pixels)."""
        return float(self.K[1, 1])

    @property
    def cx(self):
        """Principal point x (pixels)."""
        return float(self.K[0, 2])

    @property
    def cy(self):
        """Principal point y (pixels)."""
        return float(self.K[1, 2])

    @property
    def roi_active(self):
        """Return True if the ROI selects a sub-window (width and height non-zero)."""
        return self.roi.width > 0 and self.roi.height > 0

    @property
    def has_distortion(self):
        """Return True unless the camera is a plain pinhole (see :func:`distorts`)."""
        return distorts(self.D, self.distortion_model)

    def distortion_coefficients(self):
        """Return D as float64 padded with zeros to the model's length 5 / 8 / 4 (or empty)."""
        if not self.has_distortion:
            return np.zeros(0)
        needed = DISTORTION_MODELS[self.distortion_model]
        out = np.zeros(needed)
        out[:min(needed, self.D.size)] = self.D[:needed]
        return out

    # ------------------------------------------------------------------ ROS messages

    @classmethod
    def from_msg(cls, msg):
        """
        Build a validated model from an rclpy or rosbags sensor_msgs/CameraInfo.

        :raises CalibrationError: zero / NaN / inf focal length, all-zero K, zero size,
            bad ROI, unsupported distortion model with non-zero D, ...
        """
        roi = msg.roi
        return cls(width=msg.width, height=msg.height, K=np.asarray(msg.k, np.float64),
                   D=np.asarray(msg.d, np.float64), distortion_model=msg.distortion_model,
                   P=np.asarray(msg.p, np.float64), R=np.asarray(msg.r, np.float64),
                   binning_x=msg.binning_x, binning_y=msg.binning_y,
                   roi=Roi(roi.x_offset, roi.y_offset, roi.width, roi.height,
                           bool(roi.do_rectify)),
                   frame_id=msg.header.frame_id)

    def to_msg(self, header=None):
        """Build a sensor_msgs/CameraInfo (default header: a zero stamp and ``frame_id``)."""
        msg = CameraInfo()
        msg.header = header if header is not None else Header(frame_id=self.frame_id)
        msg.width = self.width
        msg.height = self.height
        if self.distortion_model or self.has_distortion:
            msg.distortion_model = self.distortion_model
            msg.d = [float(v) for v in self.D]
        else:
            # No distortion: publish what undistorted drivers publish (5 zeros, plumb_bob).
            msg.distortion_model = 'plumb_bob'
            msg.d = [0.0] * 5
        msg.k = self.K.ravel().tolist()
        msg.r = self.R.ravel().tolist()
        msg.p = self.P.ravel().tolist()
        msg.binning_x = self.binning_x
        msg.binning_y = self.binning_y
        msg.roi = RegionOfInterest(x_offset=self.roi.x_offset, y_offset=self.roi.y_offset,
                                   width=self.roi.width, height=self.roi.height,
                                   do_rectify=self.roi.do_rectify)
        return msg

    def rectified(self):
        """
        Return the camera of the rectified image: K from P, no distortion, R identity.

        A rectified image (image_rect) comes with its raw camera's camera_info; as in
        image_geometry and depth_image_proc, its pinhole camera is P's left 3x3 (P itself,
        with a stereo camera's baseline column, is kept for the published camera_info).

        :raises CalibrationError: P's left 3x3 is not a valid camera matrix
        """
        try:
            return dataclasses.replace(self, K=self.P[:, :3].copy(), D=np.zeros(0),
                                       distortion_model='plumb_bob', R=None)
        except CalibrationError as error:
            raise CalibrationError(error.reason, f'rectified input: the camera comes from P, '
                                                 f'which is not usable: {error}') from None

    # ------------------------------------------------------------------ binning / ROI

    def effective(self):
        """
        Return the model of the image actually published: ROI and binning folded in.

        K and P are mapped by the crop ``u - x_offset`` then the binning (pixel-centre
        convention, see the module docstring); width/height become the binned ROI size,
        binning 0 and ROI zero.  The P offset uses the raw ROI (exact when the ROI is the full
        image or the distortion is small; the rectified ROI would need the full rectification
        map).  A model without binning or ROI is returned unchanged.
        """
        bx, by = max(1, self.binning_x), max(1, self.binning_y)
        if bx == 1 and by == 1 and not self.roi_active:
            if self.binning_x == 0 and self.binning_y == 0 and self.roi == Roi():
                return self
            return dataclasses.replace(self, binning_x=0, binning_y=0, roi=Roi())
        if self.roi_active:
            x0, y0, full_w, full_h = self.roi[:4]
        else:
            x0, y0, full_w, full_h = 0, 0, self.width, self.height
        crop = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]])
        affine = pixel_scale_matrix(1.0 / bx, 1.0 / by) @ crop
        return dataclasses.replace(
            self, width=full_w // bx, height=full_h // by, K=affine @ self.K,
            P=affine @ self.P, binning_x=0, binning_y=0, roi=Roi())


def pixel_scale_matrix(sx, sy):
    """Return the 3x3 map A (``K' = A @ K``) of a resize by (sx, sy) = new / old, pixel centres."""
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def scale_camera(model, new_width, new_height):
    """
    Return the model of the published image after resizing to (new_width, new_height).

    The model is first made :meth:`~CameraModel.effective` (ROI and binning folded into K
    and P), then rows 0 and 1 of K and P are scaled with the pixel-centre convention
    ``cx' = (cx + 0.5) * sx - 0.5`` matching the estimator's bilinear, align_corners=False
    resize (see the module docstring).  D and R are unchanged (distortion acts on
    normalised coordinates).  The result has binning 0 and ROI zero.

    :raises ValueError: non-positive size.
    """
    new_width, new_height = int(new_width), int(new_height)
    if new_width <= 0 or new_height <= 0:
        raise ValueError(f'new size must be positive, got {new_width}x{new_height}')
    eff = model.effective()
    if (new_width, new_height) == (eff.width, eff.height):
        return eff
    affine = pixel_scale_matrix(new_width / eff.width, new_height / eff.height)
    return dataclasses.replace(eff, width=new_width, height=new_height, K=affine @ eff.K,
                               P=affine @ eff.P)


# --------------------------------------------------------------------------- unprojection


@functools.lru_cache(maxsize=16)
def _ray_grid(height, width, k_key, d_key, distortion_model):
    """Return cached float32 (rx, ry, valid) with the ray (rx, ry, 1) through each pixel."""
    k = np.array(k_key).reshape(3, 3)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    ry = (v - k[1, 2]) / k[1, 1]
    rx = (u - k[0, 2] - k[0, 1] * ry) / k[0, 0]
    if distorts(d_key, distortion_model):
        rx, ry = undistort_normalized(rx, ry, np.array(d_key), distortion_model)
    valid = np.isfinite(rx) & np.isfinite(ry)
    rx32, ry32 = rx.astype(np.float32), ry.astype(np.float32)
    for arr in (rx32, ry32, valid):
        arr.setflags(write=False)
    return rx32, ry32, valid


def pixel_rays(height, width, K, D=None, distortion_model=''):
    """
    Return the rays (x / z, y / z) through every pixel centre, cached per camera.

    :return: read-only float32 (rx, ry) of shape (height, width) and a bool validity mask
        (False where undistortion failed).
    """
    k_key = tuple(float(v) for v in np.asarray(K, np.float64).ravel())
    if len(k_key) != 9:
        raise ValueError(f'K must have 9 elements, got {len(k_key)}')
    d = np.zeros(0) if D is None else np.asarray(D, np.float64).ravel()
    d_key = tuple(float(v) for v in d) if distorts(d, distortion_model) else ()
    if d_key and distortion_model not in DISTORTION_MODELS:
        raise CalibrationError(
            'unknown_distortion_model', f'distortion model {distortion_model!r} is not '
            'supported; supported: ' + ', '.join(DISTORTION_MODELS))
    return _ray_grid(int(height), int(width), k_key, d_key, distortion_model)


def unproject_depth(depth, K, D=None, distortion_model=''):
    """
    Turn a depth image (z along the optical axis) into an HxWx3 point image.

    ``x = (u - cx) * z / fx``, ``y = (v - cy) * z / fy`` (with skew and, if D is given,
    undistortion of the pixel first).  Pixels with NaN, inf or ``<= 0`` depth give NaN
    points (all three coordinates).  The per-pixel rays are cached per
    (H, W, K, D, model), so a stream costs three multiplications per pixel.

    :param depth: HxW depth in meters (z, REP 118).
    :param K: 3x3 intrinsics, or a :class:`CameraModel` (its :meth:`~CameraModel.effective`
        K, D and model are used and its size must match the depth image).
    :param D: distortion coefficients (ROS order); ignored when K is a CameraModel.
    :return: HxWx3 float32 points in the camera optical frame.
    :raises ValueError: bad shapes or a size mismatch with a CameraModel.
    """
    z = np.asarray(depth)
    if z.ndim != 2:
        raise ValueError(f'depth must be HxW, got shape {z.shape}')
    height, width = z.shape
    if isinstance(K, CameraModel):
        eff = K.effective()
        if (eff.width, eff.height) != (width, height):
            raise ValueError(f'camera model is {eff.width}x{eff.height} but the depth image '
                             f'is {width}x{height}; scale the model with scale_camera first')
        K, D, distortion_model = eff.K, eff.distortion_coefficients(), eff.distortion_model
    rx, ry, ray_ok = pixel_rays(height, width, K, D, distortion_model)
    z = z.astype(np.float32, copy=False)
    with np.errstate(invalid='ignore'):
        valid = np.isfinite(z) & (z > 0) & ray_ok
    zz = np.where(valid, z, np.float32(np.nan))
    out = np.empty((height, width, 3), np.float32)
    np.multiply(rx, zz, out=out[:, :, 0])
    np.multiply(ry, zz, out=out[:, :, 1])
    out[:, :, 2] = zz
    return out


# --------------------------------------------------------------------------- projection


def project_points(points_cam, model):
    """
    Project 3-D points in the camera optical frame to pixels of the image ``model`` describes.

    Uses K and D (the raw, unrectified image the depth is computed on), with ROI and binning
    folded in (:meth:`CameraModel.effective`), plumb_bob, rational_polynomial or
    equidistant distortion as OpenCV's projectPoints.  Points with ``z <= MIN_DEPTH``, points
    beyond the radius where the distortion polynomial folds back, and points outside the
    image (``-0.5 <= u < width - 0.5``, same for v: ``np.rint(uv)`` is a valid pixel index)
    have ``mask`` False.

    :param points_cam: (N, 3) points (meters).
    :return: (uv (N, 2) float64, NaN where z is too small; z (N,) float64; mask (N,) bool).
    """
    pts = np.asarray(points_cam, np.float64).reshape(-1, 3)
    eff = model.effective()
    z = pts[:, 2].copy()
    with np.errstate(invalid='ignore'):
        front = z > MIN_DEPTH
    safe_z = np.where(front, z, np.nan)
    x = pts[:, 0] / safe_z
    y = pts[:, 1] / safe_z
    coeffs = eff.distortion_coefficients()
    xd, yd = distort_normalized(x, y, coeffs, eff.distortion_model)
    if distorts(coeffs, eff.distortion_model):
        with np.errstate(invalid='ignore'):
            front &= ~beyond_monotonic(np.hypot(x, y), coeffs, eff.distortion_model)
    k = eff.K
    uv = np.empty((pts.shape[0], 2))
    uv[:, 0] = k[0, 0] * xd + k[0, 1] * yd + k[0, 2]
    uv[:, 1] = k[1, 1] * yd + k[1, 2]
    with np.errstate(invalid='ignore'):
        inside = (uv[:, 0] >= -0.5) & (uv[:, 0] < eff.width - 0.5) & \
            (uv[:, 1] >= -0.5) & (uv[:, 1] < eff.height - 0.5)
    return uv, z, front & inside


# --------------------------------------------------------------------------- transforms


def quaternion_to_matrix(quaternion_xyzw):
    """Return the 3x3 float64 rotation of a quaternion (x, y, z, w), normalised first."""
    q = np.asarray(quaternion_xyzw, np.float64).ravel()
    if q.size != 4 or not np.all(np.isfinite(q)):
        raise ValueError(f'quaternion must be 4 finite values (x, y, z, w), got {q.tolist()}')
    norm = np.linalg.norm(q)
    if norm < 1e-12:
        raise ValueError('quaternion has zero norm')
    x, y, z, w = q / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def transform_points(points, translation, quaternion_xyzw):
    """
    Apply a rigid transform ``p' = R(q) p + t`` to points (REP 103 frames).

    With (t, q) from a geometry_msgs/Transform returned by ``lookup_transform(target,
    source)``, this maps points from the source frame into the target frame.

    :param points: (..., 3) points.
    :return: transformed points, same shape; float32 input stays float32, other input
        becomes float64.
    :raises ValueError: bad shapes or quaternion.
    """
    pts = np.asarray(points)
    if pts.shape[-1:] != (3,):
        raise ValueError(f'points must have shape (..., 3), got {pts.shape}')
    t = np.asarray(translation, np.float64).ravel()
    if t.size != 3:
        raise ValueError(f'translation must have 3 values, got {t.size}')
    rot = quaternion_to_matrix(quaternion_xyzw)
    out = pts.astype(np.float64) @ rot.T + t
    return out.astype(np.float32) if pts.dtype == np.float32 else out
