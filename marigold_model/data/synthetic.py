"""
Procedural synthetic RGB-D scenes rendered by vectorised numpy ray casting.

A scene is a closed room holding yaw-rotated boxes resting on the floor and spheres, each
surface with a procedural texture in surface coordinates (so perspective-correct), lit by
one point light with hard shadows plus ambient, then gamma and mild noise. Hard cases for a
small depth model follow: thin poles, shelves and bars, occluders in front of visible objects,
camouflaged objects (a texture copied from another surface) and painted decals. They are drawn
from a child stream of the scene generator, so switching them off gives the scenes of before.

World frame: x, y horizontal, z up, floor at z = 0. Camera frame: REP 103 optical (x right,
y down, z forward). The rendering is :mod:`marigold_model.data.raycast`.

``python -m marigold_model.data.synthetic --output DIR`` writes PNG previews.
"""

import argparse
from dataclasses import dataclass, field, replace
import os

from marigold_model.data.raycast import cast_rays, render, ROOM_FACES, surface
from marigold_model.data.sample import intrinsics_from_hfov
import numpy as np

TEXTURES = ('checker', 'stripe', 'sine')
MOTIONS = ('static', 'orbit', 'forward')


# SceneConfig changes that switch the hard cases off: the scenes of the generator before them
# (the held-out set of the first bundled model, ``synthetic-basic`` in marigold-eval).
NO_HARD_CASES = {'n_thin': (0, 0), 'n_occluders': (0, 0), 'camouflage_prob': 0.0,
                 'n_decals': (0, 0)}


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
    # Hard cases, drawn after everything above from a child stream (see add_hard_cases).
    n_thin: tuple = (0, 3)  # poles on the floor, floating shelves and bars
    thin_half_size: tuple = (0.01, 0.05)  # the thin half extents
    thin_half_length: tuple = (0.2, 1.0)  # the long half extents
    thin_float_height: tuple = (0.3, 2.0)  # centre height of shelves and bars
    n_occluders: tuple = (0, 2)  # objects in front of a visible object, partly covering it
    occluder_gap: tuple = (0.3, 1.5)  # how much nearer the camera than what they cover
    occluder_half_size: tuple = (0.1, 0.4)
    camouflage_prob: float = 0.25  # an object takes the texture of another surface
    n_decals: tuple = (0, 3)  # painted rectangles on visible room faces and boxes
    decal_size: tuple = (0.1, 0.8)  # side lengths

    def __post_init__(self):
        """Reject empty or reversed ranges and unknown texture names."""
        if self.height < 1 or self.width < 1:
            raise ValueError(f'SceneConfig: image size must be positive, got '
                             f'{self.height}x{self.width}')
        for name in ('fov_deg', 'room_size', 'room_height', 'n_boxes', 'n_spheres',
                     'box_half_size', 'box_height', 'sphere_radius', 'object_distance',
                     'texture_period', 'light_intensity', 'light_falloff', 'ambient',
                     'camera_height', 'camera_pitch_deg', 'camera_roll_deg', 'gamma',
                     'noise_sigma', 'n_thin', 'thin_half_size', 'thin_half_length',
                     'thin_float_height', 'n_occluders', 'occluder_gap', 'occluder_half_size',
                     'n_decals', 'decal_size'):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f'SceneConfig.{name} must be (low, high) with low <= high, '
                                 f'got {value!r}')
        for name in ('room_size', 'room_height', 'box_half_size', 'box_height',
                     'sphere_radius', 'texture_period', 'light_falloff', 'gamma',
                     'thin_half_size', 'thin_half_length', 'thin_float_height', 'occluder_gap',
                     'occluder_half_size', 'decal_size'):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f'SceneConfig.{name} must be positive, got '
                                 f'{getattr(self, name)!r}')
        if min(self.n_boxes + self.n_spheres + self.n_thin + self.n_occluders + self.n_decals
               + self.noise_sigma) < 0:
            raise ValueError('SceneConfig: object counts and noise must be non-negative')
        if not 0.0 <= self.camouflage_prob <= 1.0:
            raise ValueError(f'SceneConfig.camouflage_prob must lie in [0, 1], got '
                             f'{self.camouflage_prob!r}')
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
    # Decals: texture row decal_texture[j] replaces the object's own on object decal_object[j]
    # inside u0 <= u < u1, v0 <= v < v1 (decal_rect[j], surface coordinates); later on top.
    decal_object: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    decal_rect: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    decal_texture: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))


# The per-row fields of Textures (the decal fields index into them).
_TEXTURE_ROWS = ('kind', 'color0', 'color1', 'period', 'angle', 'phase', 'duty', 'ratio')


@dataclass(frozen=True, eq=False)
class Scene:
    """Everything needed to render one procedural room from any camera pose."""

    room_min: np.ndarray  # (3,) room corner, z = 0 (floor)
    room_max: np.ndarray  # (3,)
    box_center: np.ndarray  # (nb, 3); z = half height for boxes on the floor, not for shelves
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


def _place_xy(rng, config, room_min, size, cam_pos, cam_yaw, hfov, radius):
    """Object centre: in the view cone with some probability, clamped into the room."""
    room_max = room_min + size
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
        return _place_xy(rng, config, room_min, size, cam_pos, cam_yaw, hfov, radius)

    centers, halves, yaws = [], [], []
    for _ in range(_count(rng, config.n_boxes)):
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
    for _ in range(_count(rng, config.n_spheres)):
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
    scene = Scene(room_min=room_min, room_max=room_max, box_center=box_center,
                  box_half=box_half, box_yaw=box_yaw, sphere_center=sphere_center,
                  sphere_radius=sphere_radius, textures=make_textures(rng, n_obj, config),
                  light_position=light, light_intensity=_uniform(rng, config.light_intensity),
                  light_falloff=_uniform(rng, config.light_falloff),
                  ambient=_uniform(rng, config.ambient), gamma=_uniform(rng, config.gamma),
                  noise_sigma=_uniform(rng, config.noise_sigma), camera=camera, hfov_deg=hfov,
                  config=config)
    return add_hard_cases(child_rng(rng), scene)


# --------------------------------------------------------------------------------------------
# Hard cases: appended after the base scene, from their own stream


def child_rng(rng):
    """
    Return a new Generator seeded from a child of ``rng``'s SeedSequence.

    ``rng`` itself is not advanced, so the base scene and the render noise drawn from it stay
    exactly as they were before the hard cases existed.
    """
    return np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])


def _take_textures(textures, rows):
    """Textures with the given rows, in that order (no decals: they index rows)."""
    return Textures(**{name: getattr(textures, name)[rows] for name in _TEXTURE_ROWS})


def _stack_textures(first, second):
    """Rows of ``first`` then ``second``; the decals of ``first`` are kept."""
    rows = {name: np.concatenate([getattr(first, name), getattr(second, name)])
            for name in _TEXTURE_ROWS}
    return Textures(**rows, decal_object=first.decal_object, decal_rect=first.decal_rect,
                    decal_texture=first.decal_texture)


def _append_boxes(scene, center, half, yaw, textures):
    """Add boxes after the existing ones; their texture rows go before the spheres'."""
    split = ROOM_FACES + scene.n_boxes
    n = len(scene.textures.kind)
    order = np.concatenate([np.arange(split), n + np.arange(len(yaw)), np.arange(split, n)])
    return replace(scene, box_center=np.concatenate([scene.box_center, center]),
                   box_half=np.concatenate([scene.box_half, half]),
                   box_yaw=np.concatenate([scene.box_yaw, yaw]),
                   textures=_take_textures(_stack_textures(scene.textures, textures), order))


def _box_fits(scene, center, half, yaw):
    """Whether a box keeps clear of the camera and of the light."""
    c, h, y = center[None], half[None], np.array([yaw])
    return not (_inside_box(np.asarray(scene.camera.position), c, h, y,
                            scene.config.camera_clearance)[0]
                or _inside_box(scene.light_position, c, h, y, 0.05)[0])


def _count(rng, bounds):
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _thin_box(rng, config, room_height):
    """Half extents and centre height of a pole (on the floor), a shelf or a bar (floating)."""
    thin = rng.uniform(config.thin_half_size[0], config.thin_half_size[1], size=2)
    length = _uniform(rng, config.thin_half_length)
    kind = int(rng.integers(3))
    if kind == 0:  # pole
        half_z = min(length, 0.5 * room_height)
        return np.array([thin[0], thin[1], half_z]), half_z
    if kind == 1:  # shelf or table top: thin vertically
        half = np.array([length, rng.uniform(config.thin_half_length[0], length), thin[0]])
    else:  # bar or rail: long in one horizontal direction only
        half = np.array([length, thin[0], thin[1]])
    z = np.clip(_uniform(rng, config.thin_float_height), half[2], room_height - half[2])
    return half, float(z)


def _add_thin_objects(rng, scene):
    """Add thin boxes, mostly in view: a tiny model tends to miss them."""
    config = scene.config
    size = scene.room_max - scene.room_min
    cam = scene.camera
    centers, halves, yaws = [], [], []
    for _ in range(_count(rng, config.n_thin)):
        half, z = _thin_box(rng, config, size[2])
        yaw = float(rng.uniform(0.0, np.pi))
        for _ in range(10):
            xy = _place_xy(rng, config, scene.room_min, size, np.asarray(cam.position),
                           cam.yaw, scene.hfov_deg, float(np.hypot(half[0], half[1])))
            center = np.array([xy[0], xy[1], z])
            if _box_fits(scene, center, half, yaw):
                centers.append(center)
                halves.append(half)
                yaws.append(yaw)
                break
    return _append_boxes(scene, np.array(centers).reshape(-1, 3),
                         np.array(halves).reshape(-1, 3), np.array(yaws, dtype=np.float64),
                         make_textures(rng, len(yaws), config))


def _view_rays(rng, scene, n):
    """Return ``n`` random unit world directions inside 90 % of the configured image."""
    tan_x = np.tan(np.deg2rad(scene.hfov_deg) / 2)
    tan_y = tan_x * scene.config.height / scene.config.width
    cam = np.stack([rng.uniform(-0.9, 0.9, n) * tan_x, rng.uniform(-0.9, 0.9, n) * tan_y,
                    np.ones(n)])
    world = scene.camera.rotation() @ cam
    return world / np.linalg.norm(world, axis=0)


def _add_occluders(rng, scene):
    """
    Add pillars (on the floor) or floating spheres in front of visible objects.

    Each sits on the viewing ray of a random point of an object, nearer the camera by
    ``occluder_gap``, so it covers part of it: depth edges between two objects.
    """
    config = scene.config
    origin = np.asarray(scene.camera.position, dtype=np.float64)
    for _ in range(_count(rng, config.n_occluders)):
        direction = _view_rays(rng, scene, 16)
        t, obj = cast_rays(origin[:, None], direction, scene)
        gap = _uniform(rng, config.occluder_gap)
        half = rng.uniform(config.occluder_half_size[0], config.occluder_half_size[1], size=2)
        pillar = rng.uniform() < 0.5
        yaw = float(rng.uniform(0.0, np.pi / 2))
        textures = make_textures(rng, 1, config)
        # The nearest gap that keeps the occluder clear of the camera, if it is in range.
        gap_max = t - config.camera_clearance - 1.5 * half.max()
        ok = np.flatnonzero((obj >= ROOM_FACES) & (gap_max >= config.occluder_gap[0]))
        if not ok.size:
            continue
        j = ok[0]
        point = origin + (t[j] - min(gap, gap_max[j])) * direction[:, j]
        if pillar:
            half_z = 0.5 * min(point[2] + half[1], 0.95 * scene.room_max[2])
            center = np.array([point[0], point[1], half_z])
            box_half = np.array([half[0], half[0], half_z])
            if _box_fits(scene, center, box_half, yaw):
                scene = _append_boxes(scene, center[None], box_half[None], np.array([yaw]),
                                      textures)
        elif not _inside_sphere(scene.light_position, point[None], half[:1], 0.05)[0]:
            scene = replace(scene, sphere_center=np.concatenate([scene.sphere_center,
                                                                 point[None]]),
                            sphere_radius=np.concatenate([scene.sphere_radius, half[:1]]),
                            textures=_stack_textures(scene.textures, textures))
    return scene


def _camouflage(rng, scene):
    """Give some objects the exact texture of a room face or an untouched object."""
    n = len(scene.textures.kind)
    picked = np.flatnonzero(rng.uniform(size=n) < scene.config.camouflage_prob)
    picked = picked[picked >= ROOM_FACES]
    sources = np.setdiff1d(np.arange(n), picked)
    rows = np.arange(n)
    rows[picked] = rng.choice(sources, size=len(picked))
    return replace(scene, textures=_take_textures(scene.textures, rows))


def _add_decals(rng, scene):
    """Paint textured or plain rectangles where random view rays hit a room face or box."""
    config = scene.config
    m = _count(rng, config.n_decals)
    origin = np.asarray(scene.camera.position, dtype=np.float64)[:, None]
    direction = _view_rays(rng, scene, m)
    t, obj = cast_rays(origin, direction, scene)
    _, u, v = surface(origin + t * direction, obj, scene)
    side = rng.uniform(config.decal_size[0], config.decal_size[1], size=(m, 2))
    start = np.stack([u, v], axis=1) - side * rng.uniform(0.2, 0.8, size=(m, 2))
    paint = make_textures(rng, m, config)
    plain = rng.uniform(size=m) < 0.5
    paint.color1[plain] = paint.color0[plain]
    keep = obj < ROOM_FACES + scene.n_boxes
    n = len(scene.textures.kind)
    textures = _stack_textures(scene.textures, _take_textures(paint, np.flatnonzero(keep)))
    rect = np.stack([start[:, 0], start[:, 0] + side[:, 0], start[:, 1], start[:, 1] + side[:, 1]],
                    axis=1)
    return replace(scene, textures=replace(textures, decal_object=obj[keep],
                                           decal_rect=rect[keep],
                                           decal_texture=n + np.arange(keep.sum())))


def add_hard_cases(rng, scene):
    """Append thin objects, occluders, camouflage and decals (in that order) from ``rng``."""
    scene = _add_thin_objects(rng, scene)
    scene = _add_occluders(rng, scene)
    scene = _camouflage(rng, scene)
    return _add_decals(rng, scene)


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
