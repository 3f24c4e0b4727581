"""
Vectorised numpy ray casting of the procedural rooms of :mod:`marigold_model.data.synthetic`.

Arrays are (3, N) or (N,); origins may be (3, 1) to broadcast. Primary rays are cast with
camera-frame directions ((u - cx) / fx, (v - cy) / fy, 1), so the ray parameter of a hit is
its planar z depth, exactly.
"""

from marigold_model.data.sample import Sample
import numpy as np

# Object ids: 0..5 are the room faces (2 * axis + (1 for the max side)), then boxes, spheres;
# an object's id is also its texture row (decal rows follow).
ROOM_FACES = 6
# Hit epsilon and shadow-ray origin offset, in meters (scenes are metric, a few meters big).
_EPS = 1e-6
_SHADOW_OFFSET = 1e-4
# The two in-plane axes for a plane whose normal is axis 0, 1 or 2 (texture coordinates).
_PLANE_AXES = np.array([[1, 2], [0, 2], [0, 1]])


def _safe(d):
    """Replace near-zero direction components so divisions stay finite."""
    return np.where(np.abs(d) < 1e-12, 1e-12, d)


def _box_local(origin, direction, scene):
    """Ray origins / directions in every box frame: tuples of (nb, N) arrays."""
    c = np.cos(scene.box_yaw)[:, None]
    s = np.sin(scene.box_yaw)[:, None]
    rx = origin[0][None, :] - scene.box_center[:, 0:1]
    ry = origin[1][None, :] - scene.box_center[:, 1:2]
    rz = origin[2][None, :] - scene.box_center[:, 2:3]
    o = (c * rx + s * ry, -s * rx + c * ry, rz)
    d = (c * direction[0][None, :] + s * direction[1][None, :],
         -s * direction[0][None, :] + c * direction[1][None, :],
         np.broadcast_to(direction[2][None, :], rx.shape[:1] + direction.shape[1:]))
    return o, d


def _box_t(origin, direction, scene):
    """Entry distance of each ray into each box, inf on a miss; (nb, N)."""
    o, d = _box_local(origin, direction, scene)
    near = far = None
    for axis in range(3):
        inv = 1.0 / _safe(d[axis])
        h = scene.box_half[:, axis:axis + 1]
        t1 = (-h - o[axis]) * inv
        t2 = (h - o[axis]) * inv
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        near = lo if near is None else np.maximum(near, lo)
        far = hi if far is None else np.minimum(far, hi)
    return np.where((near <= far) & (near > _EPS), near, np.inf)


def _sphere_t(origin, direction, scene):
    """First intersection distance of each ray with each sphere, inf on a miss; (ns, N)."""
    oc = [origin[k][None, :] - scene.sphere_center[:, k:k + 1] for k in range(3)]
    a = (direction * direction).sum(axis=0)[None, :]
    b = sum(direction[k][None, :] * oc[k] for k in range(3))
    c = sum(oc[k] * oc[k] for k in range(3)) - scene.sphere_radius[:, None] ** 2
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _room_t(origin, direction, scene):
    """Exit distance from the room and the face id hit; the origin must be inside."""
    d = _safe(direction)
    bound = np.where(d > 0, scene.room_max[:, None], scene.room_min[:, None])
    t = (bound - origin) / d
    axis = np.argmin(t, axis=0)
    idx = np.arange(t.shape[1])
    face = 2 * axis + (d[axis, idx] > 0)
    return t[axis, idx], face


def cast_rays(origin, direction, scene):
    """Closest hit: distance (N,) and object id (N,)."""
    t, obj = _room_t(origin, direction, scene)
    first = ROOM_FACES
    for count, fn in ((scene.n_boxes, _box_t), (scene.n_spheres, _sphere_t)):
        if count:
            ts = fn(origin, direction, scene)
            k = np.argmin(ts, axis=0)
            tk = ts[k, np.arange(ts.shape[1])]
            closer = tk < t
            t = np.where(closer, tk, t)
            obj = np.where(closer, first + k, obj)
        first += count
    return t, obj


def _occluded(origin, to_light, scene):
    """Whether a box or sphere blocks the segment origin -> origin + to_light; (N,) bool."""
    blocked = np.zeros(origin.shape[1], dtype=bool)
    for count, fn in ((scene.n_boxes, _box_t), (scene.n_spheres, _sphere_t)):
        if count:
            blocked |= (fn(origin, to_light, scene) < 1.0).any(axis=0)
    return blocked


def surface(points, obj, scene):
    """Compute unit normals (3, N) and texture coordinates u, v (N,) at hit points."""
    n = points.shape[1]
    normal = np.zeros((3, n))
    u = np.zeros(n)
    v = np.zeros(n)
    idx = np.arange(n)

    room = obj < ROOM_FACES
    if room.any():
        face = obj[room]
        axis = face // 2
        normal[axis, idx[room]] = np.where(face % 2 == 1, -1.0, 1.0)  # pointing inwards
        p = points[:, room]
        cols = np.arange(p.shape[1])
        u[room] = p[_PLANE_AXES[axis, 0], cols]
        v[room] = p[_PLANE_AXES[axis, 1], cols]

    box = (obj >= ROOM_FACES) & (obj < ROOM_FACES + scene.n_boxes)
    if box.any():
        k = obj[box] - ROOM_FACES
        c, s = np.cos(scene.box_yaw[k]), np.sin(scene.box_yaw[k])
        rel = points[:, box] - scene.box_center[k].T
        local = np.stack([c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2]])
        half = scene.box_half[k].T
        axis = np.argmax(np.abs(local) / half, axis=0)
        cols = np.arange(local.shape[1])
        sign = np.sign(local[axis, cols])
        n_local = np.zeros_like(local)
        n_local[axis, cols] = sign
        normal[0, box] = c * n_local[0] - s * n_local[1]
        normal[1, box] = s * n_local[0] + c * n_local[1]
        normal[2, box] = n_local[2]
        u[box] = local[_PLANE_AXES[axis, 0], cols]
        v[box] = local[_PLANE_AXES[axis, 1], cols]

    sphere = obj >= ROOM_FACES + scene.n_boxes
    if sphere.any():
        k = obj[sphere] - ROOM_FACES - scene.n_boxes
        r = scene.sphere_radius[k]
        rel = points[:, sphere] - scene.sphere_center[k].T
        normal[:, sphere] = rel / r
        # Cylindrical coordinates: arc length around z and height.
        u[sphere] = r * np.arctan2(rel[1], rel[0])
        v[sphere] = rel[2]
    return normal, u, v


def _texture_rows(obj, u, v, textures):
    """Texture row of every hit: its object's own, or that of a decal painted over it."""
    rows = obj
    for k, rect, row in zip(textures.decal_object, textures.decal_rect, textures.decal_texture):
        inside = (obj == k) & (u >= rect[0]) & (u < rect[1]) & (v >= rect[2]) & (v < rect[3])
        rows = np.where(inside, row, rows)
    return rows


def _albedo(obj, u, v, textures):
    """Texture colour (N, 3) of every hit from its texture row's pattern (``obj``: rows)."""
    period = textures.period[obj]
    ca, sa = np.cos(textures.angle[obj]), np.sin(textures.angle[obj])
    a = (ca * u + sa * v) / period + textures.phase[obj, 0]
    b = (-sa * u + ca * v) / period + textures.phase[obj, 1]
    kind = textures.kind[obj]
    mix = np.empty_like(a)
    sel = kind == 0  # checker
    mix[sel] = (np.floor(a[sel]) + np.floor(b[sel])) % 2.0
    sel = kind == 1  # stripe
    mix[sel] = (a[sel] - np.floor(a[sel])) < textures.duty[obj[sel]]
    sel = kind == 2  # sine
    mix[sel] = 0.5 + 0.25 * (np.sin(2 * np.pi * a[sel])
                             + np.sin(2 * np.pi * b[sel] * textures.ratio[obj[sel]]))
    mix = mix[:, None]
    return textures.color0[obj] * (1.0 - mix) + textures.color1[obj] * mix


def render(scene, pose, K, height, width, rng=None, name='synthetic'):
    """
    Ray cast a scene from a camera pose.

    :param pose: CameraPose (must be inside the room)
    :param K: 3x3 intrinsics (pixel centres at integer coordinates)
    :param rng: Generator for the image noise; None renders without noise (deterministic)
    :return: Sample with exact planar z depth, valid where rays hit
    """
    K = np.asarray(K, dtype=np.float64)
    origin = np.asarray(pose.position, dtype=np.float64).reshape(3, 1)
    if np.any(origin[:, 0] <= scene.room_min) or np.any(origin[:, 0] >= scene.room_max):
        raise ValueError(f'render: camera position {origin[:, 0]} is outside the room '
                         f'{scene.room_min} .. {scene.room_max}')
    uu, vv = np.meshgrid(np.arange(width, dtype=np.float64),
                         np.arange(height, dtype=np.float64))
    # Invert K for pixel rays with z = 1 in the camera frame (handles skew as well).
    rays_cam = np.linalg.solve(K, np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)]))
    rays_cam /= rays_cam[2:3]
    direction = pose.rotation() @ rays_cam

    t, obj = cast_rays(origin, direction, scene)
    points = origin + t * direction
    normal, u, v = surface(points, obj, scene)

    to_light = scene.light_position[:, None] - points
    dist = np.sqrt((to_light * to_light).sum(axis=0))
    cos_in = np.maximum((normal * to_light).sum(axis=0) / np.maximum(dist, 1e-9), 0.0)
    lit = cos_in > 0
    if lit.any():
        start = points[:, lit] + _SHADOW_OFFSET * normal[:, lit]
        shadow = _occluded(start, scene.light_position[:, None] - start, scene)
        cos_in[np.flatnonzero(lit)[shadow]] = 0.0
    irradiance = scene.light_intensity * cos_in / (1.0 + (dist / scene.light_falloff) ** 2)
    shade = scene.ambient + irradiance

    albedo = _albedo(_texture_rows(obj, u, v, scene.textures), u, v, scene.textures)
    color = albedo * (shade ** (1.0 / scene.gamma))[:, None]
    if rng is not None and scene.noise_sigma > 0:
        color = color + rng.normal(0.0, scene.noise_sigma, size=color.shape)
    rgb = np.clip(np.rint(color * 255.0), 0, 255).astype(np.uint8).reshape(height, width, 3)

    depth = t.reshape(height, width)
    valid = np.isfinite(depth) & (depth > 0)
    depth = np.where(valid, depth, 0.0).astype(np.float32)
    return Sample(rgb=rgb, depth=depth, valid=valid, K=K.copy(), name=name)
