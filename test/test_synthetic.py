"""Tests for the procedural synthetic RGB-D scene generator."""

from dataclasses import replace
import hashlib

from marigold_model.data.raycast import cast_rays, ROOM_FACES
from marigold_model.data.sample import intrinsics_from_hfov, Sample
from marigold_model.data.synthetic import (CameraPose, child_rng, make_scene, make_textures,
                                           NO_HARD_CASES, render, render_scene, render_sequence,
                                           scene_intrinsics, SceneConfig, SyntheticDataset,
                                           write_previews)
import numpy as np
import pytest

EMPTY = SceneConfig(n_boxes=(0, 0), n_spheres=(0, 0), noise_sigma=(0.0, 0.0), **NO_HARD_CASES)


def _empty_room(room_min, room_max, n_objects=0, **changes):
    """Return an object-free scene with the given room and enough textures for n_objects."""
    rng = np.random.default_rng(0)
    scene = make_scene(rng, EMPTY)
    return replace(scene, room_min=np.asarray(room_min, float),
                   room_max=np.asarray(room_max, float),
                   textures=make_textures(rng, 6 + n_objects, EMPTY), **changes)


@pytest.mark.parametrize('height,width', [(64, 64), (48, 80)])
def test_shapes_dtypes_and_valid_depth(height, width):
    for seed in range(5):
        s = render_scene(np.random.default_rng(seed), height=height, width=width)
        assert isinstance(s, Sample)
        assert s.rgb.shape == (height, width, 3) and s.rgb.dtype == np.uint8
        assert s.depth.shape == (height, width) and s.depth.dtype == np.float32
        assert s.valid.dtype == np.bool_ and s.valid.all()  # a closed room: every ray hits
        assert np.isfinite(s.depth).all() and (s.depth > 0).all()
        assert s.depth.max() < 20.0  # rooms are at most 8 m x 8 m x 4 m
        assert s.K.shape == (3, 3) and s.K.dtype == np.float64
        assert s.rgb.std() > 5  # textured and shaded, not a flat image


def test_default_size_from_config():
    s = render_scene(np.random.default_rng(1), SceneConfig(height=24, width=40))
    assert s.rgb.shape == (24, 40, 3)


def test_fov_within_config_range():
    for seed in range(10):
        s = render_scene(np.random.default_rng(seed), height=32, width=64)
        hfov = np.rad2deg(2 * np.arctan(32 / s.K[0, 0]))
        assert 45.0 - 1e-6 <= hfov <= 80.0 + 1e-6
        assert s.K[0, 0] == pytest.approx(s.K[1, 1])


def test_planar_depth_exact_on_facing_wall():
    # Camera at the origin looking along +x at a wall 3.25 m away; the wall is huge, so every
    # pixel sees it, and planar depth equals the wall distance everywhere.
    scene = _empty_room([-1.0, -100.0, -100.0], [3.25, 100.0, 100.0])
    pose = CameraPose(position=(0.0, 0.0, 0.0))
    K = intrinsics_from_hfov(80, 48, 70.0)
    s = render(scene, pose, K, 48, 80)
    np.testing.assert_allclose(s.depth, 3.25, rtol=1e-6)


def test_planar_depth_exact_for_turned_camera():
    # Turned and rolled camera: unprojecting z-depth must land every point on the wall x = 4.
    scene = _empty_room([-1.0, -100.0, -100.0], [4.0, 100.0, 100.0])
    pose = CameraPose(position=(0.5, 0.2, 0.1), yaw=0.3, pitch=-0.2, roll=0.1)
    K = intrinsics_from_hfov(50, 40, 60.0)
    s = render(scene, pose, K, 40, 50)
    v, u = np.mgrid[0:40, 0:50]
    rays = np.linalg.solve(K, np.stack([u.ravel(), v.ravel(), np.ones(u.size)]))
    points = np.asarray(pose.position)[:, None] + pose.rotation() @ (rays * s.depth.ravel())
    np.testing.assert_allclose(points[0], 4.0, atol=1e-5)
    assert s.depth.min() < s.depth.max() - 0.1  # a turned view is not fronto-parallel


def test_floor_from_above_and_sphere_depth_and_shadow():
    # Looking straight down from 1.5 m: the floor is at planar depth 1.5 everywhere.
    room = ([-10.0, -10.0, 0.0], [10.0, 10.0, 4.0])
    light = np.array([0.0, 0.0, 3.5])
    base = _empty_room(*room, n_objects=1, light_position=light, ambient=0.1,
                       light_intensity=1.0, noise_sigma=0.0, gamma=2.2)
    pose = CameraPose(position=(0.0, 0.0, 1.5), yaw=0.4, pitch=np.pi / 2)
    K = intrinsics_from_hfov(33, 33, 50.0)
    lit = render(base, pose, K, 33, 33)
    np.testing.assert_allclose(lit.depth, 1.5, rtol=1e-6)

    # A sphere between the light and the floor (above the camera, so out of view) casts a
    # shadow onto the floor below: the same floor pixels get darker, the depth is unchanged.
    shaded = render(replace(base, sphere_center=np.array([[0.0, 0.0, 2.5]]),
                            sphere_radius=np.array([0.4])), pose, K, 33, 33)
    np.testing.assert_array_equal(shaded.depth, lit.depth)
    centre = (slice(12, 21), slice(12, 21))
    assert shaded.rgb[centre].mean() < 0.8 * lit.rgb[centre].mean()

    # Seen from the side, the centre ray hits the sphere at exactly distance - radius.
    side = CameraPose(position=(-3.0, 0.0, 2.5))
    s = render(replace(base, sphere_center=np.array([[0.0, 0.0, 2.5]]),
                       sphere_radius=np.array([0.4])), side, K, 33, 33)
    assert s.depth[16, 16] == pytest.approx(2.6, rel=1e-6)


def test_box_face_depth_exact():
    rng = np.random.default_rng(0)
    scene = _empty_room([-10.0, -10.0, 0.0], [10.0, 10.0, 4.0], n_objects=1)
    scene = replace(scene, box_center=np.array([[3.0, 0.0, 1.0]]),
                    box_half=np.array([[0.5, 1.0, 1.0]]), box_yaw=np.array([0.0]),
                    textures=make_textures(rng, 7))
    s = render(scene, CameraPose(position=(0.0, 0.0, 1.0)), intrinsics_from_hfov(21, 21, 30.0),
               21, 21)
    assert s.depth[10, 10] == pytest.approx(2.5, rel=1e-6)  # front face at x = 3 - 0.5


def test_camera_outside_room_rejected():
    scene = _empty_room([0.0, 0.0, 0.0], [4.0, 4.0, 3.0])
    with pytest.raises(ValueError, match='outside the room'):
        render(scene, CameraPose(position=(5.0, 1.0, 1.0)), intrinsics_from_hfov(8, 8, 60), 8, 8)


def test_deterministic_per_seed():
    a = render_scene(np.random.default_rng([7, 3]))
    b = render_scene(np.random.default_rng([7, 3]))
    c = render_scene(np.random.default_rng([7, 4]))
    np.testing.assert_array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.depth, b.depth)
    assert not np.array_equal(a.depth, c.depth)


def test_dataset_deterministic_per_index_any_order():
    ds = SyntheticDataset(length=6, seed=11, height=16, width=24)
    forward = [ds[i] for i in range(6)]
    backward = [SyntheticDataset(length=6, seed=11, height=16, width=24)[i] for i in range(5, -1,
                                                                                           -1)]
    for x, y in zip(forward, backward[::-1]):
        np.testing.assert_array_equal(x.rgb, y.rgb)
        np.testing.assert_array_equal(x.depth, y.depth)
    assert len(ds) == 6 and forward[0].name != forward[1].name
    assert not np.array_equal(forward[0].depth, forward[1].depth)
    with pytest.raises(IndexError):
        ds[6]


def test_static_sequence_frames_identical():
    frames = render_sequence(np.random.default_rng(2), 4, height=24, width=32, motion='static')
    assert len(frames) == 4 and [f.name for f in frames][0] == 'frame_0000'
    for f in frames[1:]:
        np.testing.assert_array_equal(f.rgb, frames[0].rgb)
        np.testing.assert_array_equal(f.depth, frames[0].depth)


@pytest.mark.parametrize('motion', ['orbit', 'forward'])
def test_moving_sequence_is_smooth(motion):
    changed = 0
    for seed in range(3):
        frames = render_sequence(np.random.default_rng(seed), 6, height=24, width=32,
                                 motion=motion)
        assert all(f.valid.all() for f in frames)
        means = np.array([f.depth.mean() for f in frames])
        # Small steps: consecutive frames differ by a few percent of the depth at most.
        assert np.all(np.abs(np.diff(means)) < 0.1 * means[:-1])
        changed += not np.array_equal(frames[0].depth, frames[-1].depth)
        if motion == 'forward':
            assert np.all(np.diff(means) <= 1e-6)  # moving ahead brings the scene closer
    assert changed >= 2


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match='fov_deg'):
        SceneConfig(fov_deg=(80.0, 45.0))
    with pytest.raises(ValueError, match='textures'):
        SceneConfig(textures=('plaid',))
    with pytest.raises(ValueError, match='motion'):
        render_sequence(np.random.default_rng(0), 2, motion='spin')


def test_texture_kinds_all_render():
    for kind in ('checker', 'stripe', 'sine'):
        s = render_scene(np.random.default_rng(3), SceneConfig(textures=(kind,)), 32, 32)
        assert s.rgb.std() > 5


def test_write_previews(tmp_path):
    paths = write_previews(tmp_path, count=2, height=16, width=20)
    from PIL import Image
    assert len(paths) == 2
    with Image.open(paths[0]) as image:
        assert image.size == (40, 16)  # rgb | colour-mapped depth


# --------------------------------------------------------------------------------------------
# Hard cases (thin objects, occluders, camouflage, decals)

# sha256 (first 16 hex digits) of rgb, depth, valid and K bytes of SyntheticDataset(seed) items
# 0..5 at 64x64, made with the generator before the hard cases existed (commit 352b288, default
# SceneConfig) by _digest below.
PREVIOUS_DIGESTS = {
    1: ['6d0adecb5b286acf', '9e8345e11b5db5b8', '842f69e3ec676095', '6e95cadfcaab039b',
        '472a2a69da136b0d', 'c2939912b8b99b11'],
    1000001: ['2ef023dddf5d4636', 'beb985a50e4ed351', 'eb1ca32360bc9f1b', 'd3d3724d1a90c498',
              'f1ca996843475f8d', '02aad0e6ae847bba'],
}


def _digest(sample):
    h = hashlib.sha256()
    for array in (sample.rgb, sample.depth, sample.valid, sample.K):
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def _object_ids(scene, size):
    """Object id seen by every pixel of a size x size render from the scene's camera."""
    K = scene_intrinsics(scene, size, size)
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    rays = np.linalg.solve(K, np.stack([u.ravel(), v.ravel(), np.ones(u.size)]))
    origin = np.asarray(scene.camera.position)[:, None]
    return cast_rays(origin, scene.camera.rotation() @ rays, scene)[1]


@pytest.mark.parametrize('seed', sorted(PREVIOUS_DIGESTS))
def test_hard_cases_off_reproduce_previous_samples(seed):
    dataset = SyntheticDataset(6, seed, SceneConfig(**NO_HARD_CASES), 64, 64)
    assert [_digest(dataset[i]) for i in range(6)] == PREVIOUS_DIGESTS[seed]
    # With them on, the same samples change (the default draws hard cases).
    on = SyntheticDataset(6, seed, SceneConfig(), 64, 64)
    assert sum(_digest(on[i]) != d for i, d in enumerate(PREVIOUS_DIGESTS[seed])) >= 3


def test_child_rng_leaves_parent_stream_alone():
    rng = np.random.default_rng([3, 4])
    before = rng.bit_generator.state
    child = child_rng(rng)
    assert rng.bit_generator.state == before
    assert child.uniform() != np.random.default_rng([3, 4]).uniform()


def test_hard_cases_appended_to_the_same_base_scene():
    for i in range(8):
        base = make_scene(np.random.default_rng([9, i]), SceneConfig(**NO_HARD_CASES))
        full = make_scene(np.random.default_rng([9, i]))
        assert full.camera == base.camera
        np.testing.assert_array_equal(full.light_position, base.light_position)
        np.testing.assert_array_equal(full.box_center[:base.n_boxes], base.box_center)
        np.testing.assert_array_equal(full.sphere_radius[:base.n_spheres], base.sphere_radius)
        np.testing.assert_array_equal(full.textures.kind[:ROOM_FACES],
                                      base.textures.kind[:ROOM_FACES])


def test_hard_cases_appear_with_defaults():
    scenes = [make_scene(np.random.default_rng([5, i])) for i in range(30)]
    thin_seen = camouflaged = decals = 0
    for scene in scenes:
        thin = ROOM_FACES + np.flatnonzero(scene.box_half.min(axis=1) < 0.06)
        thin_seen += np.isin(_object_ids(scene, 64), thin).any()
        t = scene.textures
        n = ROOM_FACES + scene.n_boxes + scene.n_spheres
        rows = np.concatenate([t.kind[:n, None], t.color0[:n], t.color1[:n],
                               t.period[:n, None], t.angle[:n, None], t.phase[:n]], axis=1)
        camouflaged += any((rows == rows[k]).all(axis=1).sum() > 1
                           for k in range(ROOM_FACES, n))
        decals += len(t.decal_object) > 0
    assert sum((s.box_half.min(axis=1) < 0.06).any() for s in scenes) >= 15
    assert thin_seen >= 8  # measured 52 % of scenes over 300
    assert camouflaged >= 8
    assert decals >= 15


def test_occluder_covers_an_object():
    covering = 0
    for i in range(20):
        base = make_scene(np.random.default_rng([6, i]), SceneConfig(**NO_HARD_CASES))
        only = make_scene(np.random.default_rng([6, i]), SceneConfig(
            **dict(NO_HARD_CASES, n_occluders=(2, 2))))
        before, after = _object_ids(base, 48), _object_ids(only, 48)
        # Occluders are boxes after the base boxes and spheres after the base spheres, which
        # shifts the base spheres' ids by the number of new boxes.
        first_box, added = ROOM_FACES + base.n_boxes, only.n_boxes - base.n_boxes
        before = np.where(before >= first_box, before + added, before)
        new = ((after >= first_box) & (after < first_box + added)) | (
            after >= ROOM_FACES + only.n_boxes + base.n_spheres)
        # An occluder pixel where an object was before, and the object still shows elsewhere.
        hidden = np.unique(before[new & (before >= ROOM_FACES)])
        covering += any(np.isin(after, k).any() for k in hidden)
    assert covering >= 10


def test_decals_change_colour_not_depth():
    changed = 0
    for i in range(10):
        scene = make_scene(np.random.default_rng([8, i]),
                           SceneConfig(**dict(NO_HARD_CASES, n_decals=(3, 3))))
        bare = replace(scene, textures=replace(scene.textures,
                                               decal_object=scene.textures.decal_object[:0]))
        K = scene_intrinsics(scene, 48, 48)
        a = render(scene, scene.camera, K, 48, 48)
        b = render(bare, scene.camera, K, 48, 48)
        np.testing.assert_array_equal(a.depth, b.depth)
        changed += (a.rgb != b.rgb).any()
    assert changed >= 8


def test_dataset_with_hard_cases_deterministic():
    dataset = SyntheticDataset(4, 21, SceneConfig(), 32, 32)
    for i in range(4):
        assert _digest(dataset[i]) == _digest(dataset[i])


def test_floating_thin_box_depth_exact():
    # A shelf 2 cm thick, centred 1.7 m above the floor (not at its half height), 3 m ahead.
    scene = _empty_room([-10.0, -10.0, 0.0], [10.0, 10.0, 4.0], n_objects=1)
    scene = replace(scene, box_center=np.array([[3.0, 0.0, 1.7]]),
                    box_half=np.array([[0.3, 0.5, 0.01]]), box_yaw=np.array([0.0]),
                    textures=make_textures(np.random.default_rng(0), 7))
    s = render(scene, CameraPose(position=(0.0, 0.0, 1.7)), intrinsics_from_hfov(41, 41, 20.0),
               41, 41)
    assert s.depth[20, 20] == pytest.approx(2.7, rel=1e-6)  # front face at x = 3 - 0.3
    assert s.depth[16, 20] == pytest.approx(10.0, rel=1e-6)  # just above it: the far wall


@pytest.mark.parametrize('changes,match', [({'camouflage_prob': 1.5}, 'camouflage_prob'),
                                           ({'n_thin': (3, 1)}, 'n_thin'),
                                           ({'thin_half_size': (0.0, 0.05)}, 'thin_half_size'),
                                           ({'n_decals': (-1, 2)}, 'non-negative')])
def test_bad_hard_case_config_rejected(changes, match):
    with pytest.raises(ValueError, match=match):
        SceneConfig(**changes)
