"""
Lens distortion of ROS camera models (plumb_bob, rational_polynomial, equidistant).

Both directions on normalised image coordinates (x / z, y / z): distortion in closed form,
undistortion by Newton iteration, with points where a model folds back marked NaN.
"""

import functools
import math

import numpy as np

# Undistortion: Newton iterations and the residual in normalised image units (1e-6 px at
# f = 1000 px) above which a pixel is taken as outside the model's invertible area.
_NEWTON_ITERATIONS = 20
_UNDISTORT_TOLERANCE = 1e-9


def distorts(coeffs, distortion_model):
    """Return True unless the model is a plain pinhole (equidistant is not, even all-zero)."""
    return distortion_model == 'equidistant' or bool(np.any(coeffs))


def distort_normalized(x, y, coeffs, distortion_model):
    """
    Apply lens distortion to normalised image coordinates (OpenCV formulas).

    plumb_bob / rational_polynomial::

        r2 = x^2 + y^2
        radial = (1 + k1 r2 + k2 r2^2 + k3 r2^3) / (1 + k4 r2 + k5 r2^2 + k6 r2^3)
        xd = x radial + 2 p1 x y + p2 (r2 + 2 x^2)
        yd = y radial + p1 (r2 + 2 y^2) + 2 p2 x y

    equidistant (OpenCV fisheye)::

        theta = atan(r);  theta_d = theta (1 + k1 theta^2 + k2 theta^4 + k3 theta^6
        + k4 theta^8);  xd = x theta_d / r

    :param x: normalised x (X / Z), any shape.
    :param y: normalised y (Y / Z), same shape.
    :param coeffs: coefficients in ROS order (padded to the model length), or empty.
    :return: (xd, yd) float64 arrays.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    coeffs = np.asarray(coeffs, np.float64)
    if not distorts(coeffs, distortion_model):
        return x.copy(), y.copy()
    if distortion_model == 'equidistant':
        k1, k2, k3, k4 = _padded(coeffs, 4)
        r = np.hypot(x, y)
        theta = np.arctan(r)
        t2 = theta * theta
        theta_d = theta * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
        with np.errstate(invalid='ignore', divide='ignore'):
            scale = np.where(r > 1e-12, theta_d / r, 1.0)
        return x * scale, y * scale
    k1, k2, p1, p2, k3, k4, k5, k6 = _padded(coeffs, 8)
    r2 = x * x + y * y
    radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return xd, yd


def _padded(coeffs, n):
    out = np.zeros(n)
    out[:min(n, coeffs.size)] = coeffs[:n]
    return out


def undistort_normalized(xd, yd, coeffs, distortion_model):
    """
    Invert :func:`distort_normalized` by Newton's method (vectorised).

    Points where the iteration does not reach a residual below 1e-9 (outside the region
    where the distortion model is invertible) are NaN.

    :return: (x, y) float64 arrays.
    """
    xd = np.asarray(xd, np.float64)
    yd = np.asarray(yd, np.float64)
    coeffs = np.asarray(coeffs, np.float64)
    if not distorts(coeffs, distortion_model):
        return xd.copy(), yd.copy()
    x, y = xd.copy(), yd.copy()
    step = 1e-6
    with np.errstate(all='ignore'):
        for _ in range(_NEWTON_ITERATIONS):
            fx, fy = distort_normalized(x, y, coeffs, distortion_model)
            ex, ey = fx - xd, fy - yd
            # Newton converges in a few steps where the model is invertible; stop early (the
            # pixel grid of a camera is computed once, but its first frame waits for it).
            if not np.any(np.hypot(ex, ey) >= 0.01 * _UNDISTORT_TOLERANCE):
                break
            # Central-difference Jacobian: only the convergence speed depends on its accuracy,
            # the residual test below decides whether the result is right.
            ax, ay = distort_normalized(x + step, y, coeffs, distortion_model)
            bx, by = distort_normalized(x - step, y, coeffs, distortion_model)
            cx, cy = distort_normalized(x, y + step, coeffs, distortion_model)
            dx, dy = distort_normalized(x, y - step, coeffs, distortion_model)
            j11, j21 = (ax - bx) / (2 * step), (ay - by) / (2 * step)
            j12, j22 = (cx - dx) / (2 * step), (cy - dy) / (2 * step)
            det = j11 * j22 - j12 * j21
            x = x - (j22 * ex - j12 * ey) / det
            y = y - (-j21 * ex + j11 * ey) / det
        fx, fy = distort_normalized(x, y, coeffs, distortion_model)
        bad = ~(np.hypot(fx - xd, fy - yd) < _UNDISTORT_TOLERANCE)
        if distortion_model == 'equidistant':
            bad |= ~(np.arctan(np.hypot(x, y)) < 0.5 * np.pi)
        bad |= beyond_monotonic(np.hypot(x, y), coeffs, distortion_model)
    return np.where(bad, np.nan, x), np.where(bad, np.nan, y)


@functools.lru_cache(maxsize=32)
def _monotonic_radius(coeffs_key, distortion_model):
    """
    Return the radius (normalised) up to which radial distortion increases with r.

    Beyond it the polynomial folds back and far off-axis points land inside the image
    (the classic OpenCV projectPoints artefact); such points are rejected.
    """
    coeffs = np.array(coeffs_key)
    radii = np.linspace(0.0, 20.0, 200001)
    rd, _ = distort_normalized(radii, np.zeros_like(radii), coeffs, distortion_model)
    with np.errstate(invalid='ignore'):
        falling = np.nonzero(~(np.diff(rd) > 0))[0]
    return float(radii[falling[0]]) if falling.size else math.inf


def beyond_monotonic(radius, coeffs, distortion_model):
    """Mark normalised radii past the point where the model's radial distortion folds back."""
    limit = _monotonic_radius(tuple(float(c) for c in coeffs), distortion_model)
    return ~(radius <= limit)
