"""
Metric scale from sparse depth: sampling and temporal tracking.

:func:`sample_sparse_pairs` pairs a sparse depth image of any resolution with the relative
depth map; :class:`ScaleTracker` turns the pairs into a gated, optionally smoothed
``metric ~= scale * rel + shift`` that ages out. No ROS here: the node's
``marigold_ros/scale_recovery.py`` converts messages and :mod:`marigold_model.scale_apply`
applies the estimate.
"""

from dataclasses import dataclass, replace
import math
import threading

import numpy as np

from .alignment import (AlignmentError, fit_scale_shift_robust, REASON_TOO_FEW_INLIERS,
                        REASON_TOO_FEW_POINTS)

REASON_GATED_OUTLIER = 'gated_outlier'
REASON_LOW_INLIER_RATIO = 'low_inlier_ratio'
REASON_FLAT_FIT = 'flat_fit'

#: Smallest share of the sparse depths' spread (10th to 90th percentile) a fit must explain.
MIN_EXPLAINED_SPREAD = 0.5

STATUS_OK = 'ok'
STATUS_STALE = 'stale'
STATUS_NO_ESTIMATE = 'no_estimate'


@dataclass(frozen=True)
class ScaleTrackerConfig:
    """
    Settings of :class:`ScaleTracker`.

    Defaults suit a real Marigold prediction: its AbsRel after alignment is 5-10 % on the
    usual benchmarks, so the inlier threshold is 10 % and 40 % inliers suffice.

    :param min_points: fewest valid sparse samples for a fit (else ``too_few_points``)
    :param inlier_threshold_rel: inlier threshold on ``|s r + t - d| / d``
    :param min_inlier_ratio: fewest inliers / points for a fit (else ``low_inlier_ratio``)
    :param min_rel_span: smallest relative-depth span of the samples (else
        ``degenerate_range``: e.g. all points on one wall pin no scale)
    :param ransac_iterations: RANSAC hypotheses per fit
    :param smoothing: weight of a new fit in the exponential average (1.0 = none: Marigold
        normalises each frame's depth on its own, so one frame's scale does not carry over)
    :param anchors: the two relative depths whose implied metric depth is smoothed and gated
    :param gate_factor: reject a fit whose anchor depth differs from the current estimate by
        more than this factor (``gated_outlier``); without smoothing, not when the current
        estimate explains fewer than ``min_inlier_ratio`` of the new samples (a new view)
    :param reinit_after: after this many consecutive gated fits that agree with each other,
        the next such fit re-initialises the estimate (the scene really changed)
    :param stale_after_s: the estimate is reported ``stale`` when older than this
    :param max_stale_s: beyond this age the estimate is dropped (``current`` returns None)
    :param seed: seed of the tracker's random generator (deterministic replays)
    """

    min_points: int = 20
    inlier_threshold_rel: float = 0.1
    min_inlier_ratio: float = 0.4
    min_rel_span: float = 0.05
    ransac_iterations: int = 200
    smoothing: float = 1.0
    anchors: tuple = (0.25, 0.75)
    gate_factor: float = 1.5
    reinit_after: int = 3
    stale_after_s: float = 0.5
    max_stale_s: float = 2.0
    seed: int = 0

    def __post_init__(self):
        """Raise ValueError if a setting is out of range."""
        if self.min_points < 2:
            raise ValueError(f'min_points must be >= 2, got {self.min_points}')
        if not self.inlier_threshold_rel > 0:
            raise ValueError('inlier_threshold_rel must be > 0')
        if not 0.0 <= self.min_inlier_ratio <= 1.0:
            raise ValueError('min_inlier_ratio must be in [0, 1]')
        if not self.min_rel_span >= 0:
            raise ValueError('min_rel_span must be >= 0')
        if self.ransac_iterations < 1:
            raise ValueError('ransac_iterations must be >= 1')
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f'smoothing must be in (0, 1], got {self.smoothing}')
        if len(self.anchors) != 2 or not self.anchors[0] < self.anchors[1]:
            raise ValueError(f'anchors must be two increasing values, got {self.anchors}')
        if not self.gate_factor > 1.0:
            raise ValueError(f'gate_factor must be > 1, got {self.gate_factor}')
        if self.reinit_after < 0:
            raise ValueError('reinit_after must be >= 0')
        if not 0.0 <= self.stale_after_s <= self.max_stale_s:
            raise ValueError('need 0 <= stale_after_s <= max_stale_s')


@dataclass(frozen=True)
class ScaleEstimate:
    """
    Metric scale estimate: ``metric = scale * rel + shift``.

    ``status`` is ``'ok'`` (the latest update was accepted and the estimate is younger than
    ``stale_after_s``), ``'stale'`` (a previous estimate, still usable, see ``reason``) or
    ``'no_estimate'`` (scale and shift are NaN: stay relative). ``reason`` names the latest
    rejection since the last accepted fit (a ``REASON_*`` of this module or of
    :mod:`marigold_model.alignment`), None if none.

    :param scale: metric units per relative unit (NaN without estimate)
    :param shift: metric offset (NaN without estimate)
    :param inlier_ratio: inlier ratio of the last accepted fit
    :param residual: RMS relative residual of the last accepted fit's inliers
    :param n_points: valid samples of the last accepted fit
    :param age_s: time since the last accepted fit (inf without estimate)
    :param stamp_s: time of the last accepted fit (NaN without estimate)
    """

    scale: float
    shift: float
    inlier_ratio: float
    residual: float
    n_points: int
    age_s: float
    status: str
    reason: str = None
    stamp_s: float = math.nan

    @property
    def usable(self):
        """Whether scale and shift may be applied (status ``'ok'`` or ``'stale'``)."""
        return self.status != STATUS_NO_ESTIMATE

    def apply(self, rel_depth):
        """Return float32 metric depth: NaN where not positive (REP 118), all NaN if not usable."""
        rel = np.asarray(rel_depth, dtype=np.float64)
        if not self.usable:
            return np.full(rel.shape, np.nan, dtype=np.float32)
        depth = self.scale * rel + self.shift
        with np.errstate(invalid='ignore'):
            depth[~(depth > 0)] = np.nan
        return depth.astype(np.float32)


_NO_ESTIMATE = ScaleEstimate(scale=math.nan, shift=math.nan, inlier_ratio=0.0,
                             residual=math.nan, n_points=0, age_s=math.inf,
                             status=STATUS_NO_ESTIMATE)


class ScaleTracker:
    """
    Track the metric scale and shift of relative depth over time from sparse samples.

    Call :meth:`update` when sparse samples arrive and :meth:`current` for each depth frame,
    from any threads (a lock guards the state). Deterministic for a given seed and input.

    Per frame by default (``smoothing`` 1.0): Marigold normalises every prediction to its own
    nearest and farthest point, so one frame's scale and shift do not carry over once the view's
    depth range changes; and a fit that disagrees with the held estimate is not gated when the
    held estimate no longer explains the frame's own samples.

    With smoothing, the state is the metric depth implied at the two ``anchors``, averaged in log
    space. Scale and shift are strongly anti-correlated in a fit, so smoothing them separately
    mixes an old shift with a new scale and makes the depth jump; smoothing the anchor depths
    filters what the user sees, keeps the scale positive and is symmetric up and down (with zero
    shift it is log-scale smoothing). The gate compares the same depths. If an anchor depth is
    not positive (a strongly negative shift), averaging is linear and the gate uses the scale
    ratio.
    """

    def __init__(self, config=None):
        """Create a tracker with ``config`` (:class:`ScaleTrackerConfig` defaults if None)."""
        self.config = config if config is not None else ScaleTrackerConfig()
        self._rng = np.random.default_rng(self.config.seed)
        self._anchor_rel = np.asarray(self.config.anchors, dtype=np.float64)
        # Re-entrant: update() calls current() and reset() while holding it.
        self._lock = threading.RLock()
        self.reset()

    def reset(self):
        """Forget the estimate (e.g. after a time jump or a camera change)."""
        with self._lock:
            self._reset()

    def _reset(self):
        """Clear the state (caller holds the lock)."""
        self._anchor_depth = None
        self._fit = None
        self._fit_stamp = None
        self._reason = None
        self._candidate = None
        self._candidate_count = 0

    def update(self, rel_depth_samples, metric_samples, stamp_s):
        """Fold samples at ``stamp_s`` into the estimate; metric NaN or <= 0 is no reading."""
        with self._lock:
            return self._update(rel_depth_samples, metric_samples, float(stamp_s))

    def _update(self, rel_depth_samples, metric_samples, stamp):
        """Do :meth:`update` (caller holds the lock)."""
        cfg = self.config
        if self._fit_stamp is not None and stamp < self._fit_stamp - cfg.max_stale_s:
            # The clock jumped back (bag looped, simulation reset): the old fit is from the
            # "future" and says nothing about the present.
            self._reset()
        rel = np.asarray(rel_depth_samples, dtype=np.float64).ravel()
        metric = np.asarray(metric_samples, dtype=np.float64).ravel()
        if rel.shape != metric.shape:
            raise ValueError(f'{rel.size} relative samples but {metric.size} metric samples')
        try:
            fit = self._fit_once(rel, metric)
        except AlignmentError as error:
            return self._reject(error.reason, stamp)

        new_depth = self._to_anchor_depth(fit.scale, fit.shift)
        held = self.current(stamp)
        per_frame = cfg.smoothing >= 1.0
        if held is None or (per_frame and self._explains_poorly(held, rel, metric)):
            # No estimate, or per-frame fits and the held one does not fit this frame's
            # samples (the view and so the prediction's normalisation changed): the new fit
            # is taken as it is.  With smoothing (a prediction whose normalisation is
            # stable) a jump must persist for reinit_after frames, as a sensor glitch
            # looks the same as a new view from one frame's samples.
            self._accept(fit, new_depth, stamp, smooth=False)
        elif self._outside_gate(self._anchor_depth, new_depth):
            if self._candidate is not None and not self._outside_gate(self._candidate,
                                                                      new_depth):
                self._candidate_count += 1
            else:
                self._candidate_count = 1
            self._candidate = new_depth
            if self._candidate_count <= cfg.reinit_after:
                return self._reject(REASON_GATED_OUTLIER, stamp)
            self._accept(fit, new_depth, stamp, smooth=False)
        else:
            self._accept(fit, new_depth, stamp, smooth=True)
        return self.current(stamp)

    def current(self, stamp_s):
        """Return the estimate at ``stamp_s``, or None once it is older than ``max_stale_s``."""
        with self._lock:
            if self._anchor_depth is None:
                return None
            age = float(stamp_s) - self._fit_stamp
            if abs(age) > self.config.max_stale_s:
                return None
            age = max(age, 0.0)  # slightly out-of-order stamps
            fresh = self._reason is None and age <= self.config.stale_after_s
            return self._estimate(STATUS_OK if fresh else STATUS_STALE, age)

    def _fit_once(self, rel, metric):
        """Run the robust fit with this tracker's acceptance rules (AlignmentError if refused)."""
        cfg = self.config
        with np.errstate(invalid='ignore'):
            valid = np.isfinite(rel) & np.isfinite(metric) & (metric > 0)
        n = int(valid.sum())
        if n < cfg.min_points:
            raise AlignmentError(REASON_TOO_FEW_POINTS,
                                 f'{n} valid sample(s), at least {cfg.min_points} needed')
        rel, metric = rel[valid], metric[valid]
        fit = self._robust_fit(rel, metric, 'ransac')
        if self._explained_spread(fit, rel, metric) < MIN_EXPLAINED_SPREAD:
            # RANSAC counts points near a line: with a weak prediction, a flat line through
            # the densest band of depths can collect the most of them, and the 'metric'
            # depth becomes a constant.  A robust least-squares fit uses every point's
            # residual instead; if it too leaves the depths' spread unexplained, the
            # relative depth does not follow them and no scale is given.
            fit = self._robust_fit(rel, metric, 'irls')
            explained = self._explained_spread(fit, rel, metric)
            if explained < MIN_EXPLAINED_SPREAD:
                raise AlignmentError(
                    REASON_FLAT_FIT, f'the fit explains {100 * explained:.0f} % of the sparse '
                    f"depths' spread (10th to 90th percentile), below "
                    f'{100 * MIN_EXPLAINED_SPREAD:.0f} %: the relative depth does not follow '
                    'them (a model too weak for the scene, or input not registered)')
        if fit.inlier_ratio < cfg.min_inlier_ratio:
            raise AlignmentError(REASON_LOW_INLIER_RATIO,
                                 f'inlier ratio {fit.inlier_ratio:.2f} below '
                                 f'{cfg.min_inlier_ratio:.2f}')
        return fit

    def _inliers(self, scale, shift, rel, metric):
        """Mask the samples within ``inlier_threshold_rel`` of the fit (invalid ones never are)."""
        with np.errstate(invalid='ignore'):
            return np.abs(scale * rel + shift - metric) < self.config.inlier_threshold_rel * metric

    def _explains_poorly(self, estimate, rel, metric):
        """Whether fewer than ``min_inlier_ratio`` of the valid samples fit ``estimate``."""
        with np.errstate(invalid='ignore'):
            valid = np.isfinite(rel) & np.isfinite(metric) & (metric > 0)
        inliers = np.count_nonzero(self._inliers(estimate.scale, estimate.shift, rel[valid],
                                                 metric[valid]))
        return inliers < self.config.min_inlier_ratio * max(int(valid.sum()), 1)

    def _robust_fit(self, rel, metric, method):
        cfg = self.config
        try:
            return fit_scale_shift_robust(rel, metric, method=method,
                                          threshold_rel=cfg.inlier_threshold_rel,
                                          iterations=cfg.ransac_iterations,
                                          min_span=cfg.min_rel_span, rng=self._rng)
        except AlignmentError as error:
            if error.reason == REASON_TOO_FEW_INLIERS:
                raise AlignmentError(REASON_LOW_INLIER_RATIO, str(error)) from error
            raise

    def _explained_spread(self, fit, rel, metric):
        """
        Return the fitted depths' spread over the sparse depths' on the fit's inliers.

        Spreads are 10th to 90th percentiles; 1 when the inliers have no spread. A fit that follows
        its inliers reproduces their spread; a flat line through a band of depths reproduces none
        of it, however many points the band holds. Outliers are left out so a few wild readings do
        not widen the spread the fit is held to.
        """
        fitted = fit.scale * rel + fit.shift
        inliers = self._inliers(fit.scale, fit.shift, rel, metric)
        if np.count_nonzero(inliers) < 2:
            return 0.0
        low, high = np.percentile(metric[inliers], [10.0, 90.0])
        if not high - low > 0:
            return 1.0
        fitted_low, fitted_high = np.percentile(fitted[inliers], [10.0, 90.0])
        return float((fitted_high - fitted_low) / (high - low))

    def _to_anchor_depth(self, scale, shift):
        """Return the metric depths implied at the two anchor relative depths."""
        return scale * self._anchor_rel + shift

    def _outside_gate(self, reference, candidate):
        """Whether a fit's anchor depths differ from ``reference`` by more than the gate factor."""
        limit = math.log(self.config.gate_factor)
        if np.all(reference > 0) and np.all(candidate > 0):
            return bool(np.max(np.abs(np.log(candidate / reference))) > limit)
        r_ref = self._anchor_rel[1] - self._anchor_rel[0]
        scale_ref = (reference[1] - reference[0]) / r_ref
        scale_new = (candidate[1] - candidate[0]) / r_ref
        # The scale ratio misses a moved shift: the anchors must also agree within the gate,
        # relative to the larger anchor depth.
        span = max(float(np.max(np.abs(reference))), float(np.max(np.abs(candidate))), 1e-9)
        moved = float(np.max(np.abs(candidate - reference))) / span
        return bool(abs(math.log(scale_new / scale_ref)) > limit or
                    moved > self.config.gate_factor - 1.0)

    def _accept(self, fit, new_depth, stamp, smooth):
        """Take a fit into the estimate, averaged with it if ``smooth`` else replacing it."""
        alpha = self.config.smoothing
        old = self._anchor_depth
        if not smooth or old is None:
            state = new_depth
        elif np.all(old > 0) and np.all(new_depth > 0):
            state = np.exp((1.0 - alpha) * np.log(old) + alpha * np.log(new_depth))
        else:
            state = (1.0 - alpha) * old + alpha * new_depth
        self._anchor_depth = state
        self._fit = fit
        self._fit_stamp = stamp
        self._reason = None
        self._candidate = None
        self._candidate_count = 0

    def _reject(self, reason, stamp):
        """Record a rejected update; return the (possibly stale) estimate."""
        self._reason = reason
        estimate = self.current(stamp)
        if estimate is None:
            return replace(_NO_ESTIMATE, reason=reason)
        return estimate

    def _estimate(self, status, age):
        """Build the public estimate from the anchor-depth state."""
        d_low, d_high = self._anchor_depth
        r_low, r_high = self._anchor_rel
        scale = float((d_high - d_low) / (r_high - r_low))
        shift = float(d_low - scale * r_low)
        return ScaleEstimate(scale=scale, shift=shift, inlier_ratio=self._fit.inlier_ratio,
                             residual=self._fit.residual, n_points=self._fit.n_points,
                             age_s=age, status=status, reason=self._reason,
                             stamp_s=self._fit_stamp)


def sparse_pixels(sparse_metric, shape):
    """
    Map the valid pixels of a sparse depth image onto a grid of another resolution.

    Both images cover the same field of view. Each valid sparse pixel (finite, > 0) goes to
    the target pixel containing its centre, so every reading is kept whatever the two
    resolutions are, and readings are never blended with empty (0 / NaN) neighbours.

    :param sparse_metric: sparse depth, H x W (or H x W x 1); NaN or <= 0 means no reading
    :param shape: (height, width) of the target grid
    :return: (uv int64 array (N, 2) of target (column, row), float64 depths (N,))
    :raises ValueError: not a 2-D image or bad shape
    """
    sparse = np.asarray(sparse_metric, dtype=np.float64)
    if sparse.ndim == 3 and sparse.shape[2] == 1:
        sparse = sparse[:, :, 0]
    if sparse.ndim != 2:
        raise ValueError(f'sparse depth must be a 2-D image, got shape {sparse.shape}')
    height, width = (int(v) for v in shape)
    if height < 1 or width < 1:
        raise ValueError(f'target shape must be positive, got {shape}')
    with np.errstate(invalid='ignore'):
        rows, cols = np.nonzero(np.isfinite(sparse) & (sparse > 0))
    h_src, w_src = sparse.shape
    u = np.minimum(((cols + 0.5) * (width / w_src)).astype(np.int64), width - 1)
    v = np.minimum(((rows + 0.5) * (height / h_src)).astype(np.int64), height - 1)
    return np.stack([u, v], axis=1), sparse[rows, cols]


def sample_sparse_pairs(rel_depth, sparse_metric):
    """
    Pair relative depth (H x W) with sparse metric depth given at any resolution.

    :param sparse_metric: sparse metric depth image aligned with the camera, any resolution
        (NaN or 0 = no reading; convert 16UC1 millimetres to metres before)
    :return: (relative values, metric values), float64 arrays of equal length
    :raises ValueError: ``rel_depth`` is not 2-D
    """
    rel = np.asarray(rel_depth, dtype=np.float64)
    if rel.ndim != 2:
        raise ValueError(f'rel_depth must be H x W, got shape {rel.shape}')
    uv, metric = sparse_pixels(sparse_metric, rel.shape)
    values = rel[uv[:, 1], uv[:, 0]]
    keep = np.isfinite(values)
    return values[keep], metric[keep]
