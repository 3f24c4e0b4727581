"""
Procedural synthetic RGB-D scenes rendered by vectorised numpy ray casting.

A scene is a closed room holding yaw-rotated boxes resting on the floor and spheres, each
surface with a procedural texture in surface coordinates (so perspective-correct), lit by
one point light with hard shadows plus ambient, then gamma and mild noise.

World frame: x, y horizontal, z up, floor at z = 0. Camera frame: REP 103 optical (x right,
y down, z forward). The rendering is :mod:`marigold_model.data.raycast`.

``python -m marigold_model.data.synthetic --output DIR`` writes PNG previews.
"""

import argparse
from dataclasses import dataclass, field, replace
import os

from marigold_model.data.raycast import cast_rays, render, ROOM_FACES
from marigold_model.data.sample import intrinsics_from_hfov
import numpy as np

TEXTURES = ('checker', 'stripe', 'sine')
MOTIONS = ('static', 'orbit', 'forward')


@dataclass(frozen=True)
class SceneConfig:
    """
    Ranges that procedural scenes are drawn from (each ``(low, high)``, uniform).

    Lengths are in meters, angles in degrees. Integer count ranges are inclusive.
    """

    height: int = 64
    width: int = 64
    fov_deg: tuple = (45.0, 80.0)  # horizontal field of view
    room_size: tuple = (3.0, 8.0)  # each horizontal side of the room
    room_height: tuple = (2.4, 4.0)
    n_boxes: tuple = (1, 4)
    n_spheres: tuple = (0, 3)
    box_half_size: tuple = (0.15, 0.8)  # horizontal half extents
    box_height: tuple = (0.2, 2.0)
    sphere_radius: tuple = (0.15, 0.5)
    floating_sphere_prob: float = 0.3
    in_view_prob: float = 0.8  # chance an object is placed inside the camera's view cone
    object_distance: tuple = (1.0, 5.5)  # from the camera, for objects placed in view
    camera_clearance: float = 0.5  # minimum distance from the camera to any object
    textures: tuple = TEXTURES
    texture_period: tuple = (0.2, 1.5)
    light_intensity: tuple = (0.8, 1.6)
    light_falloff: tuple = (2.5, 8.0)  # distance at which the point light halves
    ambient: tuple = (0.05, 0.25)
    camera_height: tuple = (0.5, 2.0)
    camera_pitch_deg: tuple = (-15.0, 25.0)  # positive looks down
    camera_roll_deg: tuple = (-5.0, 5.0)
    wall_margin: float = 0.4  # minimum camera distance to a wall
    min_view_distance: float = 1.5  # preferred free distance in front of the camera
    gamma: tuple = (1.8, 2.4)
    noise_sigma: tuple = (0.0, 0.02)  # in [0, 1] display units

    def __post_init__(self):
        """Reject empty or reversed ranges and unknown texture names."""
        if self.height < 1 or self.width < 1:
            raise ValueError(f'SceneConfig: image size must be positive, got '
                             f'{self.height}x{self.width}')
        for name in ('fov_deg', 'room_size', 'room_height', 'n_boxes', 'n_spheres',
                     'box_half_size', 'box_height', 'sphere_radius', 'object_distance',
                     'texture_period', 'light_intensity', 'light_falloff', 'ambient',
                     'camera_height', 'camera_pitch_deg', 'camera_roll_deg', 'gamma',
                     'noise_sigma'):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f'SceneConfig.{name} must be (low, high) with low <= high, '
                                 f'got {value!r}')
        for name in ('room_size', 'room_height', 'box_half_size', 'box_height',
                     'sphere_radius', 'texture_period', 'light_falloff', 'gamma'):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f'SceneConfig.{name} must be positive, got '
                                 f'{getattr(self, name)!r}')
        if min(self.n_boxes) < 0 or min(self.n_spheres) < 0 or min(self.noise_sigma) < 0:
            raise ValueError('SceneConfig: object counts and noise must be non-negative')
        if not 0 < self.fov_deg[0] <= self.fov_deg[1] < 180:
            raise ValueError(f'SceneConfig.fov_deg must lie in (0, 180), got {self.fov_deg!r}')
        if not self.textures or any(t not in TEXTURES for t in self.textures):
            raise ValueError(f'SceneConfig.textures must be a non-empty subset of {TEXTURES}, '
                             f'got {self.textures!r}')


@dataclass(frozen=True)
class CameraPose:
    """
    Camera position (world, meters) and orientation as yaw / pitch / roll (radians).

    Yaw turns about world z (0 looks along +x), positive pitch looks down, roll turns about the
    viewing direction (positive: image content turns counter-clockwise).
    """

    position: tuple
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0

    def rotation(self):
        """Return the 3x3 rotation from the optical frame to the world (columns: optical axes)."""
        cy, sy = np.cos(self.yaw), np.sin(self.yaw)
        cp, sp = np.cos(self.pitch), np.sin(self.pitch)
        cr, sr = np.cos(self.roll), np.sin(self.roll)
        rz = np.array([[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]])
        ry = np.array([[cp, 0.0, sp], [0.0, 1.0, 0.0], [-sp, 0.0, cp]])
        rx = np.array([[1.0, 0.0, 0.0], [0.0, cr, -sr], [0.0, sr, cr]])
        # Body frame (x forward, y left, z up) -> optical (x right, y down, z forward).
        body_from_optical = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
        return rz @ ry @ rx @ body_from_optical

    def forward(self):
        """Return the (3,) unit viewing direction in the world frame."""
        return self.rotation()[:, 2]


@dataclass(frozen=True, eq=False)
class Textures:
    """Per-object texture parameters (index = object id)."""

    kind: np.ndarray  # (n,) int index into TEXTURES
    color0: np.ndarray  # (n, 3) in [0, 1]
    color1: np.ndarray  # (n, 3)
    period: np.ndarray  # (n,) meters
    angle: np.ndarray  # (n,) radians, pattern orientation in surface coordinates
    phase: np.ndarray  # (n, 2) in periods
    duty: np.ndarray  # (n,) stripe duty cycle
    ratio: np.ndarray  # (n,) second sine frequency / first


@dataclass(frozen=True, eq=False)
class Scene:
    """Everything needed to render one procedural room from any camera pose."""

    room_min: np.ndarray  # (3,) room corner, z = 0 (floor)
    room_max: np.ndarray  # (3,)
    box_center: np.ndarray  # (nb, 3); boxes rest on the floor so center z = half height
    box_half: np.ndarray  # (nb, 3) half extents in the box frame
    box_yaw: np.ndarray  # (nb,) radians about z
    sphere_center: np.ndarray  # (ns, 3)
    sphere_radius: np.ndarray  # (ns,)
    textures: Textures
    light_position: np.ndarray  # (3,)
    light_intensity: float
    light_falloff: float
    ambient: float
    gamma: float
    noise_sigma: float
    camera: CameraPose  # the viewpoint the scene was composed for
    hfov_deg: float = 60.0
    config: SceneConfig = field(default_factory=SceneConfig)

    @property
    def n_boxes(self):
        """Return the number of boxes."""
        return len(self.box_yaw)

    @property
    def n_spheres(self):
        """Return the number of spheres."""
        return len(self.sphere_radius)


# --------------------------------------------------------------------------------------------
# Scene sampling


def _uniform(rng, bounds):
    return float(rng.uniform(bounds[0], bounds[1]))


def make_textures(rng, n, config=SceneConfig()):
    """Draw random texture parameters for ``n`` objects (6 room faces + boxes + spheres)."""
    kinds = np.array([TEXTURES.index(t) for t in config.textures])
    color0 = rng.uniform(0.05, 0.95, size=(n, 3))
    color1 = rng.uniform(0.05, 0.95, size=(n, 3))
    # Keep some contrast so the texture is visible at all.
    flat = np.abs(color0 - color1).mean(axis=1) < 0.15
    color1[flat] = 1.0 - color0[flat]
    lo, hi = np.log(config.texture_period[0]), np.log(config.texture_period[1])
    return Textures(kind=rng.choice(kinds, size=n), color0=color0, color1=color1,
                    period=np.exp(rng.uniform(lo, hi, size=n)),
                    angle=rng.uniform(0.0, np.pi, size=n),
                    phase=rng.uniform(0.0, 1.0, size=(n, 2)),
                    duty=rng.uniform(0.3, 0.7, size=n),
                    ratio=rng.uniform(0.5, 2.0, size=n))


def _inside_box(point, center, half, yaw, margin=0.0):
    """Whether ``point`` lies inside each box grown by ``margin``; (nb,) bool."""
    rel = point[None, :] - center
    c, s = np.cos(yaw), np.sin(yaw)
    local = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1],
                      rel[:, 2]], axis=1)
    return np.all(np.abs(local) < half + margin, axis=1)


def _inside_sphere(point, center, radius, margin=0.0):
    return np.linalg.norm(point[None, :] - center, axis=1) < radius + margin


def _room_free_distance(position, direction, room_min, room_max):
    with np.errstate(divide='ignore'):
        bound = np.where(direction > 0, room_max, room_min)
        t = np.where(np.abs(direction) > 1e-12, (bound - position) / direction, np.inf)
    return float(np.min(t))


def make_scene(rng, config=SceneConfig()):
    """Draw a random room, objects, textures, light and camera, all from ``rng``."""
    size = np.array([_uniform(rng, config.room_size), _uniform(rng, config.room_size),
                     _uniform(rng, config.room_height)])
    offset = rng.uniform(-5.0, 5.0, size=2)  # the room is not always at the origin
    room_min = np.array([offset[0], offset[1], 0.0])
    room_max = room_min + size
    hfov = _uniform(rng, config.fov_deg)

    # Camera first: objects are then placed mostly where it looks.
    margin = min(config.wall_margin, 0.45 * size[0], 0.45 * size[1])
    cam_z = float(np.clip(_uniform(rng, config.camera_height), 0.1, size[2] - 0.2))
    best = None
    for _ in range(10):
        xy = rng.uniform(room_min[:2] + margin, room_max[:2] - margin)
        yaw = float(rng.uniform(0.0, 2.0 * np.pi))
        pos = np.array([xy[0], xy[1], cam_z])
        free = _room_free_distance(pos, np.array([np.cos(yaw), np.sin(yaw), 0.0]),
                                   room_min, room_max)
        if best is None or free > best[0]:
            best = (free, pos, yaw)
        if free >= config.min_view_distance:
            break
    _, cam_pos, cam_yaw = best
    camera = CameraPose(position=tuple(cam_pos), yaw=cam_yaw,
                        pitch=np.deg2rad(_uniform(rng, config.camera_pitch_deg)),
                        roll=np.deg2rad(_uniform(rng, config.camera_roll_deg)))

    def place_xy(radius):
        """Object centre: in the view cone with some probability, clamped into the room."""
        if rng.uniform() < config.in_view_prob:
            ang = cam_yaw + rng.uniform(-0.45, 0.45) * np.deg2rad(hfov)
            # Distance to the object's near side, not its centre, so it rarely fills the view.
            dist = _uniform(rng, config.object_distance) + radius
            xy = cam_pos[:2] + dist * np.array([np.cos(ang), np.sin(ang)])
        else:
            xy = rng.uniform(room_min[:2], room_max[:2])
        lo = room_min[:2] + np.minimum(radius, size[:2] / 2)
        hi = room_max[:2] - np.minimum(radius, size[:2] / 2)
        return np.clip(xy, lo, hi)

    centers, halves, yaws = [], [], []
    for _ in range(int(rng.integers(config.n_boxes[0], config.n_boxes[1] + 1))):
        half_xy = rng.uniform(config.box_half_size[0], config.box_half_size[1], size=2)
        half_xy = np.minimum(half_xy, 0.35 * size[:2])
        half_z = 0.5 * min(_uniform(rng, config.box_height), 0.9 * size[2])
        half = np.array([half_xy[0], half_xy[1], half_z])
        yaw = float(rng.uniform(0.0, np.pi / 2))
        for _ in range(10):
            xy = place_xy(float(np.hypot(half_xy[0], half_xy[1])))
            center = np.array([xy[0], xy[1], half_z])
            if not _inside_box(cam_pos, center[None], half[None], np.array([yaw]),
                               config.camera_clearance)[0]:
                centers.append(center)
                halves.append(half)
                yaws.append(yaw)
                break

    s_centers, radii = [], []
    for _ in range(int(rng.integers(config.n_spheres[0], config.n_spheres[1] + 1))):
        radius = min(_uniform(rng, config.sphere_radius), 0.4 * size.min())
        floating = rng.uniform() < config.floating_sphere_prob
        for _ in range(10):
            xy = place_xy(radius)
            z = rng.uniform(radius, size[2] - radius) if floating else radius
            center = np.array([xy[0], xy[1], z])
            if not _inside_sphere(cam_pos, center[None], np.array([radius]),
                                  config.camera_clearance)[0]:
                s_centers.append(center)
                radii.append(radius)
                break

    box_center = np.array(centers).reshape(-1, 3)
    box_half = np.array(halves).reshape(-1, 3)
    box_yaw = np.array(yaws, dtype=np.float64)
    sphere_center = np.array(s_centers).reshape(-1, 3)
    sphere_radius = np.array(radii, dtype=np.float64)

    # Light near the ceiling, outside every object (else everything would be in shadow).
    light = None
    for _ in range(20):
        light = np.array([*rng.uniform(room_min[:2] + 0.2, room_max[:2] - 0.2),
                          rng.uniform(0.55, 0.95) * size[2]])
        if not (_inside_box(light, box_center, box_half, box_yaw, 0.05).any()
                or _inside_sphere(light, sphere_center, sphere_radius, 0.05).any()):
            break

    n_obj = ROOM_FACES + len(box_yaw) + len(sphere_radius)
    return Scene(room_min=room_min, room_max=room_max, box_center=box_center,
                 box_half=box_half, box_yaw=box_yaw, sphere_center=sphere_center,
                 sphere_radius=sphere_radius, textures=make_textures(rng, n_obj, config),
                 light_position=light, light_intensity=_uniform(rng, config.light_intensity),
                 light_falloff=_uniform(rng, config.light_falloff),
                 ambient=_uniform(rng, config.ambient), gamma=_uniform(rng, config.gamma),
                 noise_sigma=_uniform(rng, config.noise_sigma), camera=camera, hfov_deg=hfov,
                 config=config)


# --------------------------------------------------------------------------------------------
# Public entry points


def scene_intrinsics(scene, height, width):
    """Return the 3x3 K of the scene's field of view at a given image size."""
    return intrinsics_from_hfov(width, height, scene.hfov_deg)


def render_scene(rng, config=SceneConfig(), height=None, width=None, name='synthetic'):
    """
    Draw a random scene and render it from its default camera, with noise.

    Height and width default to ``config.height`` / ``config.width``.
    """
    height = config.height if height is None else int(height)
    width = config.width if width is None else int(width)
    scene = make_scene(rng, config)
    return render(scene, scene.camera, scene_intrinsics(scene, height, width), height, width,
                  rng=rng, name=name)


def _pose_ok(scene, position, clearance=0.1):
    p = np.asarray(position, dtype=np.float64)
    if np.any(p <= scene.room_min + clearance) or np.any(p >= scene.room_max - clearance):
        return False
    return not (_inside_box(p, scene.box_center, scene.box_half, scene.box_yaw,
                            clearance).any()
                or _inside_sphere(p, scene.sphere_center, scene.sphere_radius,
                                  clearance).any())


def _free_distance(scene, position, direction):
    t, _ = cast_rays(np.asarray(position, dtype=np.float64).reshape(3, 1),
                     np.asarray(direction, dtype=np.float64).reshape(3, 1), scene)
    return float(t[0])


def camera_path(scene, n_frames, motion='static', step=0.04, max_angle_deg=10.0):
    """
    Return ``n_frames`` smooth CameraPoses around the scene's default camera.

    :param motion: 'static' (all equal), 'orbit' (an arc about a vertical axis through a point
        ahead, looking at it) or 'forward' (straight ahead, horizontally)
    :param step: translation per frame in meters for 'forward'
    :param max_angle_deg: largest total orbit angle (at most 1 degree per frame)
    """
    if motion not in MOTIONS:
        raise ValueError(f'camera_path: motion must be one of {MOTIONS}, got {motion!r}')
    if n_frames < 1:
        raise ValueError(f'camera_path: n_frames must be >= 1, got {n_frames}')
    cam = scene.camera
    p0 = np.asarray(cam.position, dtype=np.float64)
    ahead = np.array([np.cos(cam.yaw), np.sin(cam.yaw), 0.0])
    frac = np.linspace(0.0, 1.0, n_frames) if n_frames > 1 else np.zeros(1)
    if motion == 'static':
        return [cam] * n_frames
    if motion == 'forward':
        # Stay well short of whatever is ahead: the path is the ray itself.
        total = min(step * (n_frames - 1), max(0.5 * (_free_distance(scene, p0, ahead) - 0.3),
                                               0.0))
        return [replace(cam, position=tuple(p0 + f * total * ahead)) for f in frac]
    radius = float(np.clip(0.7 * _free_distance(scene, p0, ahead), 0.5, 3.0))
    pivot = p0 + radius * ahead
    amplitude = np.deg2rad(min(max_angle_deg, 1.0 * (n_frames - 1)))
    for _ in range(6):
        poses = []
        for f in frac:
            ang = amplitude * (2.0 * f - 1.0)
            c, s = np.cos(ang), np.sin(ang)
            rel = p0 - pivot
            pos = pivot + np.array([c * rel[0] - s * rel[1], s * rel[0] + c * rel[1], rel[2]])
            poses.append(replace(cam, position=tuple(pos), yaw=cam.yaw + ang))
        if all(_pose_ok(scene, p.position) for p in poses):
            return poses
        amplitude *= 0.5
    return [cam] * n_frames


def render_sequence(rng, n_frames, config=SceneConfig(), height=None, width=None,
                    motion='static', noise=False):
    """
    Render one random scene from a smoothly moving (or static) camera.

    :param motion: 'static', 'orbit' or 'forward' (see :func:`camera_path`)
    :param noise: add independent image noise per frame (off: static frames are identical)
    :return: list of Sample named ``frame_0000`` ... in order
    """
    height = config.height if height is None else int(height)
    width = config.width if width is None else int(width)
    scene = make_scene(rng, config)
    K = scene_intrinsics(scene, height, width)
    return [render(scene, pose, K, height, width, rng=rng if noise else None,
                   name=f'frame_{i:04d}')
            for i, pose in enumerate(camera_path(scene, n_frames, motion))]


try:  # torch is a dependency of marigold_model, but keep the renderer usable without it
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object


class SyntheticDataset(_Dataset):
    """
    Deterministic torch Dataset of procedural scenes.

    Sample ``i`` is rendered from ``np.random.default_rng([seed, i])``, so every index always
    gives the same Sample, in any worker and any order.
    """

    def __init__(self, length=10000, seed=0, config=SceneConfig(), height=None, width=None,
                 transform=None):
        """
        Set up ``length`` samples.

        :param height: image height (default ``config.height``)
        :param transform: optional callable ``(sample, rng) -> sample`` (e.g. TrainTransform)
        """
        if length < 0:
            raise ValueError(f'SyntheticDataset: length must be >= 0, got {length}')
        self.length = int(length)
        self.seed = int(seed)
        self.config = config
        self.height = config.height if height is None else int(height)
        self.width = config.width if width is None else int(width)
        self.transform = transform

    def __len__(self):
        """Return the number of samples."""
        return self.length

    def __getitem__(self, index):
        """Render sample ``index`` as a Sample named ``synthetic_<seed>_<index>``."""
        if not 0 <= index < self.length:
            raise IndexError(f'SyntheticDataset index {index} out of range [0, {self.length})')
        rng = np.random.default_rng([self.seed, int(index)])
        sample = render_scene(rng, self.config, self.height, self.width,
                              name=f'synthetic_{self.seed}_{int(index):06d}')
        if self.transform is not None:
            sample = self.transform(sample, rng)
        return sample


# --------------------------------------------------------------------------------------------
# Previews


def colorize_depth(depth, valid=None, value_range=None):
    """
    Map HxW depth to HxWx3 uint8 (near = yellow, far = dark purple, invalid = black).

    ``valid`` defaults to finite and > 0; ``value_range`` (near, far) defaults to the 1st and
    99th percentile of the valid depths.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if valid is None:
        valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros(depth.shape + (3,), dtype=np.uint8)
    if not valid.any():
        return out
    lo, hi = np.percentile(depth[valid], [1, 99]) if value_range is None else value_range
    # Invalid pixels (NaN, inf) are painted black below; 0 keeps the arithmetic quiet.
    x = np.clip(np.nan_to_num((depth - lo) / max(hi - lo, 1e-9), nan=0.0), 0.0, 1.0)
    stops = np.array([[252, 255, 164], [250, 140, 10], [188, 55, 84], [87, 16, 110],
                      [10, 7, 40]], dtype=np.float64)
    pos = x * (len(stops) - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
    w = (pos - i0)[..., None]
    color = stops[i0] * (1 - w) + stops[i0 + 1] * w
    out[valid] = np.rint(color[valid]).astype(np.uint8)
    return out


def write_previews(folder, count=8, seed=0, config=SceneConfig(), height=None, width=None):
    """
    Write ``count`` rgb | depth side-by-side PNG previews to ``folder``; return the paths.

    Scene i uses ``default_rng([seed, i])`` like SyntheticDataset.
    """
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    dataset = SyntheticDataset(count, seed, config, height, width)
    paths = []
    for i in range(count):
        sample = dataset[i]
        image = np.concatenate([sample.rgb, colorize_depth(sample.depth, sample.valid)], axis=1)
        path = os.path.join(folder, f'{sample.name}.png')
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def main(argv=None):
    """Write preview PNGs of synthetic scenes from the command line; return 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output', default='synthetic_previews')
    parser.add_argument('--count', type=int, default=8)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--height', type=int, default=240)
    parser.add_argument('--width', type=int, default=320)
    args = parser.parse_args(argv)
    for path in write_previews(args.output, args.count, args.seed, SceneConfig(),
                               args.height, args.width):
        print(path)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
