"""Tests for the data readers, the mixed dataset and the training transform."""

import sys
from types import SimpleNamespace

from builders import save_png
import h5py
from marigold_model.data.bag_rgbd import BagRGBDDataset, depth_from_image, rgb_from_image
from marigold_model.data.hypersim import (distance_to_planar, HYPERSIM_FOCAL,
                                          hypersim_intrinsics, HypersimDataset, tone_map)
from marigold_model.data.image_decoding import ImageConversionError
from marigold_model.data.image_io import exr_backend
from marigold_model.data.mixing import MixedDataset, TrainTransform
from marigold_model.data.rgbd_folder import RGBDFolderDataset
from marigold_model.data.sample import (collate_samples, intrinsics_from_hfov, make_sample,
                                        Sample, UnreadableSample)
from marigold_model.data.synthetic import make_scene, render, scene_intrinsics, SceneConfig
from marigold_model.data.vkitti import VKITTI2_K, VKITTI2Dataset
import numpy as np
import pytest


def _write_h5(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, 'w') as f:
        f.create_dataset('dataset', data=array)


# --------------------------------------------------------------------------------------------
# Hypersim


def _hypersim_scene(root, h=24, w=32, z=2.0, with_jpg=False):
    """Write one raw Hypersim frame seeing a fronto-parallel plane at planar depth z."""
    images = root / 'ai_001_002' / 'images'
    K = hypersim_intrinsics(h, w)
    v, u = np.mgrid[0:h, 0:w]
    dist = z * np.sqrt(((u - K[0, 2]) / K[0, 0]) ** 2 + ((v - K[1, 2]) / K[1, 1]) ** 2 + 1)
    dist = dist.astype(np.float16)
    dist[0, 0] = np.nan  # no hit
    entity = np.ones((h, w), np.int32)
    entity[1, 1] = -1
    _write_h5(images / 'scene_cam_00_geometry_hdf5' / 'frame.0003.depth_meters.hdf5', dist)
    _write_h5(images / 'scene_cam_00_geometry_hdf5' / 'frame.0003.render_entity_id.hdf5',
              entity)
    _write_h5(images / 'scene_cam_00_final_hdf5' / 'frame.0003.color.hdf5',
              np.full((h, w, 3), 3.7, np.float16))
    if with_jpg:
        save_png(images / 'scene_cam_00_final_preview' / 'frame.0003.tonemap.jpg',
                 np.full((h, w, 3), 40, np.uint8))
    return K


def test_hypersim_focal_and_distance_conversion_analytic():
    assert HYPERSIM_FOCAL == pytest.approx(886.81, abs=0.01)
    K = hypersim_intrinsics(768, 1024)
    assert K[0, 0] == pytest.approx(886.81, abs=0.01) and K[0, 2] == 511.5
    # Corner pixel (0, 0): z = dist * f / sqrt((u-cx)^2 + (v-cy)^2 + f^2).
    dist = np.full((768, 1024), 10.0)
    z = distance_to_planar(dist, K)
    f = K[0, 0]
    assert z[0, 0] == pytest.approx(10.0 * f / np.sqrt(511.5 ** 2 + 383.5 ** 2 + f ** 2),
                                    rel=1e-6)
    assert z[384, 512] < 10.0 and z.max() <= 10.0


def test_hypersim_raw_layout(tmp_path):
    K = _hypersim_scene(tmp_path, with_jpg=False)
    ds = HypersimDataset(tmp_path)
    assert len(ds) == 1
    s = ds[0]
    assert s.name == 'ai_001_002/images/scene_cam_00_geometry_hdf5/frame.0003'
    np.testing.assert_allclose(s.K, K)
    assert not s.valid[0, 0] and not s.valid[1, 1]  # NaN distance, entity -1
    assert s.valid.sum() == s.valid.size - 2 and s.depth[0, 0] == 0
    # float16 storage limits precision to ~1e-3 relative.
    np.testing.assert_allclose(s.depth[s.valid], 2.0, rtol=2e-3)
    # Grey HDR: the 90th percentile brightness maps to 0.8 -> 204 after truncation.
    assert np.all(s.rgb == 204)


def test_hypersim_prefers_tonemap_jpg(tmp_path):
    _hypersim_scene(tmp_path, with_jpg=True)
    assert abs(int(HypersimDataset(tmp_path)[0].rgb.mean()) - 40) <= 2
    assert np.all(HypersimDataset(tmp_path, prefer_jpg=False)[0].rgb == 204)


def test_hypersim_tone_map_percentile():
    rgb = np.linspace(0.0, 2.0, 300).reshape(10, 10, 3)
    rgb[9, 9] = 100.0  # a highlight, clipped to 1
    out = tone_map(rgb)
    brightness = 0.3 * rgb[..., 0] + 0.59 * rgb[..., 1] + 0.11 * rgb[..., 2]
    scale = 0.8 ** 2.2 / np.percentile(brightness, 90)
    np.testing.assert_allclose(out, np.clip((scale * rgb) ** (1 / 2.2), 0, 1))
    assert out.max() == 1.0 and out.min() == 0.0


def test_hypersim_marigold_list_file(tmp_path):
    save_png(tmp_path / 'ai_001_001' / 'rgb_cam_00_fr0000.png', np.full((6, 8, 3), 9, np.uint8))
    depth_mm = np.full((6, 8), 2500, np.uint16)
    depth_mm[2, 3] = 0
    save_png(tmp_path / 'ai_001_001' / 'depth_plane_cam_00_fr0000.png', depth_mm)
    listing = tmp_path / 'filename_list_train.txt'
    listing.write_text('rgb_path,depth_path\n'
                       'ai_001_001/rgb_cam_00_fr0000.png,'
                       'ai_001_001/depth_plane_cam_00_fr0000.png\n')
    s = HypersimDataset(tmp_path, list_file=listing)[0]
    assert s.depth[0, 0] == pytest.approx(2.5) and not s.valid[2, 3]
    assert s.K[0, 0] == pytest.approx(4.0 / np.tan(np.deg2rad(30.0)))


def test_hypersim_corrupt_file_is_unreadable(tmp_path):
    _hypersim_scene(tmp_path)
    color = next(tmp_path.glob('**/frame.0003.color.hdf5'))
    color.write_bytes(b'not an hdf5 file')
    with pytest.raises(UnreadableSample, match='color.hdf5'):
        HypersimDataset(tmp_path, prefer_jpg=False)[0]


# --------------------------------------------------------------------------------------------
# Virtual KITTI 2


def _vkitti_frame(root, depth_root=None, frame=7):
    depth_root = depth_root or root
    rgb = np.random.default_rng(0).integers(0, 255, (5, 12, 3), dtype=np.uint8)
    save_png(root / 'Scene01' / 'clone' / 'frames' / 'rgb' / 'Camera_0' / f'rgb_{frame:05d}.jpg',
             rgb)
    cm = np.full((5, 12), 1234, np.uint16)
    cm[0, :] = 65535  # sky: far plane
    cm[4, 0] = 0
    save_png(depth_root / 'Scene01' / 'clone' / 'frames' / 'depth' / 'Camera_0'
             / f'depth_{frame:05d}.png', cm)


def test_vkitti_centimetres_and_far_plane(tmp_path):
    _vkitti_frame(tmp_path)
    ds = VKITTI2Dataset(tmp_path)
    s = ds[0]
    assert len(ds) == 1 and s.name == 'Scene01/clone/Camera_0/00007'
    assert s.depth[2, 5] == pytest.approx(12.34)
    assert not s.valid[0].any() and not s.valid[4, 0] and s.valid[1:4].all()
    np.testing.assert_allclose(s.K, VKITTI2_K)
    assert s.K[0, 0] == 725.0087 and s.K[0, 2] == 620.5 and s.K[1, 2] == 187.0


def test_vkitti_separate_depth_root_and_intrinsics(tmp_path):
    rgb_root, depth_root = tmp_path / 'rgb', tmp_path / 'depth'
    _vkitti_frame(rgb_root, depth_root)
    (rgb_root / 'Scene01' / 'clone' / 'intrinsic.txt').write_text(
        'frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]\n7 0 700.0 701.0 600.0 180.0\n')
    s = VKITTI2Dataset(rgb_root, depth_root=depth_root, max_depth=10.0)[0]
    assert s.K[0, 0] == 700.0 and s.K[1, 1] == 701.0 and s.K[1, 2] == 180.0
    assert not s.valid.any()  # 12.34 m > max_depth


# --------------------------------------------------------------------------------------------
# RGB-D folder


def test_rgbd_folder_png_and_npy(tmp_path):
    save_png(tmp_path / 'rgb' / 'a.png', np.full((4, 6, 3), 100, np.uint8))
    mm = np.full((4, 6), 1500, np.uint16)
    mm[0, 0] = 0
    save_png(tmp_path / 'depth' / 'a.png', mm)
    save_png(tmp_path / 'rgb' / 'b.jpg', np.full((4, 6, 3), 50, np.uint8))
    meters = np.full((4, 6), 3.25, np.float32)
    meters[1, 1] = np.nan
    np.save(tmp_path / 'depth' / 'b.npy', meters)
    save_png(tmp_path / 'rgb' / 'c.png', np.zeros((4, 6, 3), np.uint8))  # no depth: ignored
    (tmp_path / 'K.txt').write_text('10 0 2.5\n0 11 1.5\n0 0 1\n')
    ds = RGBDFolderDataset(tmp_path)
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert a.name == 'a' and a.depth[1, 1] == pytest.approx(1.5) and not a.valid[0, 0]
    assert b.depth[0, 0] == pytest.approx(3.25) and not b.valid[1, 1] and b.depth[1, 1] == 0
    assert a.K[1, 1] == 11.0 and b.K[0, 2] == 2.5
    # Other scale, no intrinsics file -> 60 degree default.
    (tmp_path / 'K.txt').unlink()
    c = RGBDFolderDataset(tmp_path, depth_scale=0.0001)[0]
    assert c.depth[1, 1] == pytest.approx(0.15)
    np.testing.assert_allclose(c.K, intrinsics_from_hfov(6, 4, 60.0))


def test_rgbd_folder_exr_without_backend(tmp_path, monkeypatch):
    """With neither OpenCV nor imageio importable, an EXR depth folder is refused up front."""
    monkeypatch.setitem(sys.modules, 'cv2', None)  # import of a None entry fails
    monkeypatch.setitem(sys.modules, 'imageio', None)
    assert exr_backend() is None
    save_png(tmp_path / 'rgb' / 'a.png', np.zeros((4, 6, 3), np.uint8))
    (tmp_path / 'depth').mkdir()
    (tmp_path / 'depth' / 'a.exr').write_bytes(b'')
    with pytest.raises(ValueError, match='EXR'):
        RGBDFolderDataset(tmp_path)


def test_rgbd_folder_reads_exr_meters(tmp_path, monkeypatch):
    """A float EXR written by OpenCV reads back as meters, NaN and 0 invalid."""
    monkeypatch.setenv('OPENCV_IO_ENABLE_OPENEXR', '1')
    cv2 = pytest.importorskip(
        'cv2', reason='the EXR backend: pip install opencv-python-headless '
        '(requirements-dev.txt, which `make test` installs)')
    meters = (np.arange(24, dtype=np.float32).reshape(4, 6) + 1) / 8  # exact in float16 too
    meters[1, 2] = np.nan
    meters[3, 5] = 0.0
    save_png(tmp_path / 'rgb' / 'a.png', np.zeros((4, 6, 3), np.uint8))
    (tmp_path / 'depth').mkdir()
    assert cv2.imwrite(str(tmp_path / 'depth' / 'a.exr'), meters)
    sample = RGBDFolderDataset(tmp_path)[0]
    valid = np.isfinite(meters) & (meters > 0)
    np.testing.assert_array_equal(sample.valid, valid)
    np.testing.assert_array_equal(sample.depth[valid], meters[valid])


def test_rgbd_folder_bad_intrinsics_file(tmp_path):
    save_png(tmp_path / 'rgb' / 'a.png', np.zeros((4, 6, 3), np.uint8))
    (tmp_path / 'depth').mkdir()
    np.save(tmp_path / 'depth' / 'a.npy', np.ones((4, 6), np.float32))
    (tmp_path / 'intrinsics.txt').write_text('1 2 3\n')
    with pytest.raises(ValueError, match='intrinsics.txt'):
        RGBDFolderDataset(tmp_path)


@pytest.mark.parametrize('make', [
    lambda p: HypersimDataset(p), lambda p: VKITTI2Dataset(p), lambda p: RGBDFolderDataset(p),
    lambda p: BagRGBDDataset(p, '/rgb', '/depth')])
def test_wrong_root_fails_at_construction(tmp_path, make):
    missing = tmp_path / 'no_such_dataset'
    with pytest.raises(ValueError, match='no_such_dataset'):
        make(missing)


def test_empty_root_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match='no frames'):
        HypersimDataset(tmp_path)
    with pytest.raises(ValueError, match='no frames'):
        VKITTI2Dataset(tmp_path)


# --------------------------------------------------------------------------------------------
# Bags


def test_bag_decoding_step_padding_endianness_and_yuv():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 12), np.uint8)
    padded[:, :9] = rgb[..., ::-1].reshape(2, 9)
    msg = SimpleNamespace(height=2, width=3, encoding='bgr8', is_bigendian=0, step=12,
                          data=padded.ravel())
    np.testing.assert_array_equal(rgb_from_image(msg), rgb)
    counts = np.array([[1, 2], [300, 0]], np.uint16)
    for encoding in ('16UC1', 'mono16'):  # mono16 depth is read at depth_scale too
        msg = SimpleNamespace(height=2, width=2, encoding=encoding, is_bigendian=1, step=4,
                              data=np.frombuffer(counts.astype('>u2').tobytes(), np.uint8))
        depth = depth_from_image(msg, depth_scale=0.01)
        np.testing.assert_allclose(depth[counts > 0], counts[counts > 0] * 0.01, rtol=1e-6)
        assert np.isnan(depth[1, 1])  # 0 = no reading
    # UYVY grey: U = V = 128, so R = G = B = 1.164 (Y - 16), clipped: 16 -> 0, 235 -> 255.
    uyvy = np.array([128, 16, 128, 235], np.uint8)
    msg = SimpleNamespace(height=1, width=2, encoding='yuv422', is_bigendian=0, step=4,
                          data=uyvy)
    np.testing.assert_array_equal(rgb_from_image(msg), [[[0, 0, 0], [255, 255, 255]]])
    with pytest.raises(ImageConversionError, match='encoding') as err:
        rgb_from_image(SimpleNamespace(height=1, width=1, encoding='8UC5', is_bigendian=0,
                                       step=5, data=np.zeros(5, np.uint8)))
    assert err.value.reason == 'unknown_encoding'


def _write_rgbd_bag(path, frames, depth_encoding='32FC1', with_info=True):
    """Write rgb / depth / info topics with rosbags' Humble types only (no rclpy)."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import get_typestore, Stores

    ts = get_typestore(Stores.ROS2_HUMBLE)
    Image_, Header, Time = (ts.types['sensor_msgs/msg/Image'], ts.types['std_msgs/msg/Header'],
                            ts.types['builtin_interfaces/msg/Time'])
    CameraInfo, Roi = ts.types['sensor_msgs/msg/CameraInfo'], ts.types[
        'sensor_msgs/msg/RegionOfInterest']

    def header(t):
        return Header(stamp=Time(sec=int(t), nanosec=int(round((t % 1) * 1e9))), frame_id='cam')

    with Writer(path, version=9) as writer:
        c_rgb = writer.add_connection('/cam/rgb', Image_.__msgtype__, typestore=ts)
        c_depth = writer.add_connection('/cam/depth', Image_.__msgtype__, typestore=ts)
        c_info = writer.add_connection('/cam/info', CameraInfo.__msgtype__, typestore=ts)
        if with_info:
            info = CameraInfo(header=header(0.5), height=4, width=5, distortion_model='plumb_bob',
                              d=np.zeros(5), k=np.array([50.0, 0, 2, 0, 51, 1.5, 0, 0, 1]),
                              r=np.eye(3).ravel(), p=np.zeros(12), binning_x=0, binning_y=0,
                              roi=Roi(x_offset=0, y_offset=0, height=0, width=0,
                                      do_rectify=False))
            writer.write(c_info, 500_000_000, ts.serialize_cdr(info, CameraInfo.__msgtype__))
        for kind, t, array in frames:
            h, w = array.shape[:2]
            if kind == 'rgb':
                bgr = np.ascontiguousarray(array[..., ::-1])
                data = np.zeros((h, w * 3 + 4), np.uint8)  # 4 bytes of row padding
                data[:, :w * 3] = bgr.reshape(h, -1)
                msg = Image_(header=header(t), height=h, width=w, encoding='bgr8',
                             is_bigendian=0, step=w * 3 + 4, data=data.ravel())
                conn = c_rgb
            else:
                raw = array.astype(np.float32 if depth_encoding == '32FC1' else np.uint16)
                msg = Image_(header=header(t), height=h, width=w, encoding=depth_encoding,
                             is_bigendian=0, step=w * raw.itemsize,
                             data=np.frombuffer(raw.tobytes(), np.uint8))
                conn = c_depth
            writer.write(conn, int(t * 1e9), ts.serialize_cdr(msg, Image_.__msgtype__))


def test_bag_round_trip_matching_and_camera_info(tmp_path):
    rng = np.random.default_rng(0)
    rgb1, rgb2, rgb3 = (rng.integers(0, 255, (4, 5, 3), dtype=np.uint8) for _ in range(3))
    d1, d2 = np.full((4, 5), 1.25, np.float32), np.full((4, 5), 2.5, np.float32)
    d2[0, 0] = np.nan
    frames = [('rgb', 1.0, rgb1), ('depth', 1.005, d1), ('rgb', 1.1, rgb2), ('depth', 1.1, d2),
              ('rgb', 2.0, rgb3), ('depth', 2.5, d1)]  # the last rgb has no depth within 20 ms
    path = tmp_path / 'sim_bag'
    _write_rgbd_bag(path, frames)
    ds = BagRGBDDataset(path, '/cam/rgb', '/cam/depth', camera_info_topic='/cam/info')
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    np.testing.assert_array_equal(a.rgb, rgb1)  # bgr8 with row padding decoded to RGB
    np.testing.assert_array_equal(b.rgb, rgb2)
    assert np.all(a.depth == 1.25) and b.depth[1, 1] == 2.5 and not b.valid[0, 0]
    assert a.K[0, 0] == 50.0 and a.K[1, 1] == 51.0 and a.K[1, 2] == 1.5
    assert a.name == f'{1_000_000_000:019d}'
    # A loose tolerance also pairs the last frame.
    assert len(BagRGBDDataset(path, '/cam/rgb', '/cam/depth', tolerance=0.6)) == 3
    with pytest.raises(ValueError, match='/cam/nope'):
        BagRGBDDataset(path, '/cam/rgb', '/cam/nope')


def test_bag_16bit_depth_in_millimetres(tmp_path):
    mm = np.full((4, 5), 1750, np.uint16)
    mm[3, 4] = 0
    path = tmp_path / 'bag16'
    _write_rgbd_bag(path, [('rgb', 3.0, np.zeros((4, 5, 3), np.uint8)), ('depth', 3.0, mm)],
                    depth_encoding='16UC1', with_info=False)
    s = BagRGBDDataset(path, '/cam/rgb', '/cam/depth')[0]
    assert s.depth[0, 0] == pytest.approx(1.75) and not s.valid[3, 4]
    np.testing.assert_allclose(s.K, intrinsics_from_hfov(5, 4, 60.0))


# --------------------------------------------------------------------------------------------
# Mixing and transform


class _ConstDataset:
    """Tiny dataset whose samples name their source; ``bad`` indices are unreadable."""

    def __init__(self, tag, n=10, bad=()):
        self.tag, self.n, self.bad = tag, n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise UnreadableSample(f'{self.tag}[{i}] is broken')
        return make_sample(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4)), np.eye(3),
                           f'{self.tag}:{i}')


def test_mixing_probabilities_and_determinism():
    mixed = MixedDataset([_ConstDataset('a'), _ConstDataset('b')], [0.9, 0.1], length=2000,
                         seed=5)
    names = [mixed[i].name for i in range(2000)]
    share_a = np.mean([n.startswith('a') for n in names])
    assert 0.875 < share_a < 0.925  # 3.7 standard deviations
    assert len({n for n in names if n.startswith('b')}) == 10  # indices cover the dataset
    assert MixedDataset([_ConstDataset('a'), _ConstDataset('b')], [9, 1], 2000, seed=5)[
        17].name == names[17]
    assert mixed.skipped == 0


def test_mixing_skips_and_counts_unreadable():
    mixed = MixedDataset([_ConstDataset('a', bad=range(0, 10, 2)), _ConstDataset('b')],
                         [0.5, 0.5], length=200, seed=1)
    names = [mixed[i].name for i in range(200)]
    assert all(int(n.split(':')[1]) % 2 == 1 for n in names if n.startswith('a'))
    assert mixed.skipped > 20 and 'broken' in mixed.skipped_log[-1]
    hopeless = MixedDataset([_ConstDataset('a', bad=range(10))], [1.0], length=1, seed=0,
                            max_retries=3)
    with pytest.raises(RuntimeError, match='unreadable'):
        hopeless[0]
    assert hopeless.skipped == 4


def test_mixing_bad_arguments():
    with pytest.raises(ValueError, match='probabilities'):
        MixedDataset([_ConstDataset('a')], [0.5, 0.5], 10)
    with pytest.raises(ValueError, match='probabilities'):
        MixedDataset([_ConstDataset('a')], [-1.0], 10)
    with pytest.raises(ValueError, match='empty'):
        MixedDataset([_ConstDataset('a', n=0)], [1.0], 10)


def _passes(names, tag, size):
    """Split the frames drawn from one source into consecutive passes of ``size`` draws."""
    frames = [int(n.split(':')[1]) for n in names if n.startswith(tag + ':')]
    return [frames[i:i + size] for i in range(0, len(frames) - size + 1, size)]


def test_mixing_uses_every_frame_once_per_pass():
    """Each pass over a source draws each of its frames exactly once, in a fresh order."""
    mixed = MixedDataset([_ConstDataset('a', n=7), _ConstDataset('b', n=3)], [0.7, 0.3],
                         length=300, seed=2)
    names = [mixed[i].name for i in range(300)]
    for tag, size in (('a', 7), ('b', 3)):
        passes = _passes(names, tag, size)
        assert len(passes) >= 20
        for frames in passes:
            assert sorted(frames) == list(range(size))
    assert len({tuple(p) for p in _passes(names, 'a', 7)}) > 1  # reshuffled per pass
    share_a = np.mean([n.startswith('a') for n in names])
    assert 0.6 < share_a < 0.8


def _gradient_frame(name, height=20, width=30):
    """Frame whose depth grows to the right and down, so crops and flips are visible."""
    rows, cols = np.mgrid[0:height, 0:width]
    depth = 1.0 + cols + 0.01 * rows
    rgb = np.stack([cols * 8, rows * 12, cols * 0], axis=-1).astype(np.uint8)
    return make_sample(rgb, depth, intrinsics_from_hfov(width, height, 60.0), name)


class _IdenticalFrames:
    """The same gradient frame ``n`` times, named f:0 ... (no torch Dataset)."""

    def __init__(self, n):
        self.frames = [_gradient_frame(f'f:{i}') for i in range(n)]

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        return self.frames[i]


def test_mixing_crops_and_flips_change_between_passes_and_follow_the_seed():
    """A frame drawn in several passes gets different crops / flips; the seed fixes them."""
    def draws(seed, count=60):
        mixed = MixedDataset([_IdenticalFrames(3)], [1.0], length=3, seed=seed,
                             transform=TrainTransform(16, 16))
        return [mixed.sample(i) for i in range(count)]

    first = draws(7)
    for frame in range(3):
        seen = [s for s in first if s.name == f'f:{frame}']
        assert len(seen) == 20  # once per pass of 3 draws
        variants = {s.depth.tobytes() for s in seen}
        assert len(variants) > 5
        flipped = [s.depth[0, 0] > s.depth[0, -1] for s in seen]
        assert any(flipped) and not all(flipped)
    again = draws(7)
    assert all(a.name == b.name and np.array_equal(a.depth, b.depth) and np.array_equal(
        a.rgb, b.rgb) and np.array_equal(a.K, b.K) for a, b in zip(first, again))
    other = draws(8)
    assert any(not np.array_equal(a.depth, b.depth) for a, b in zip(first, other))
    # A draw is a function of its number alone: asked out of order, it is the same.
    mixed = MixedDataset([_IdenticalFrames(3)], [1.0], length=3, seed=7,
                         transform=TrainTransform(16, 16))
    for i in (41, 3, 59, 0):
        assert np.array_equal(mixed.sample(i).depth, first[i].depth)


def test_mixing_cache_key_names_exactly_one_sample():
    """Draws with equal cache keys are equal samples; unknown frames have no key yet."""
    mixed = MixedDataset([_IdenticalFrames(4)], [1.0], seed=1, transform=TrainTransform(20, 30))
    assert mixed.cache_key(0) is None  # frame never read: its crops are unknown
    samples, keys = {}, {}
    for i in range(40):
        sample = mixed.sample(i)
        key = mixed.cache_key(i)
        assert key is not None
        if key in samples:
            assert np.array_equal(samples[key].depth, sample.depth)
        samples[key], keys[i] = sample, key
    assert len(set(keys.values())) == 8  # 4 frames at the output size x 2 flips
    listed = dict(mixed.variants())
    assert set(listed) == set(keys.values())
    for key, sample in listed.items():
        assert np.array_equal(sample.depth, samples[key].depth)
    crops = MixedDataset([_IdenticalFrames(4)], [1.0], seed=1, transform=TrainTransform(16, 16))
    crops.sample(0)
    # Too many crops: not listed, and no key, so a latent cache cannot grow with the crops.
    assert crops.cache_key(0) is None and list(crops.variants()) == []


def test_transform_keeps_geometry_consistent():
    # Render a scene at 96x128, transform to 48x48 (resize by 0.5, crop), and compare with a
    # direct render of the same scene through the transformed K.
    scene = make_scene(np.random.default_rng(4), SceneConfig(noise_sigma=(0.0, 0.0)))
    big = render(scene, scene.camera, scene_intrinsics(scene, 96, 128), 96, 128)
    out = TrainTransform(48, 48, hflip=False)(big, np.random.default_rng(0))
    assert out.rgb.shape == (48, 48, 3) and out.depth.shape == (48, 48)
    direct = render(scene, scene.camera, out.K, 48, 48)
    rel = np.abs(out.depth - direct.depth) / direct.depth
    assert np.median(rel) < 0.02
    assert np.abs(out.rgb.astype(float) - direct.rgb).mean() < 25


def test_transform_flip_mirrors_cx_and_depth():
    s = make_sample(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8),
                    np.random.default_rng(1).uniform(1, 5, (20, 30)),
                    intrinsics_from_hfov(30, 20, 60.0), 'x')
    flips = 0
    for seed in range(20):
        a = TrainTransform(16, 16, hflip=False)(s, np.random.default_rng(seed))
        b = TrainTransform(16, 16, hflip=True)(s, np.random.default_rng(seed))
        if np.array_equal(b.depth, a.depth[:, ::-1]):
            flips += 1
            np.testing.assert_array_equal(b.rgb, a.rgb[:, ::-1])
            assert b.K[0, 2] == pytest.approx(15 - a.K[0, 2])
        else:
            np.testing.assert_array_equal(b.depth, a.depth)
    assert 3 <= flips <= 17


def test_transform_invalid_pixels_do_not_bleed():
    depth = np.full((30, 40), 3.0)
    depth[:, :17] = 0.0  # invalid left part
    s = make_sample(np.zeros((30, 40, 3), np.uint8), depth, np.eye(3), 'x')
    for seed in range(5):
        out = TrainTransform(13, 11, hflip=True)(s, np.random.default_rng(seed))
        assert out.depth.shape == (13, 11)
        np.testing.assert_array_equal(out.valid, out.depth > 0)
        assert set(np.unique(out.depth)) <= {0.0, 3.0}


def test_sample_validation_and_collate():
    with pytest.raises(ValueError, match='float32'):
        Sample(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2)), np.ones((2, 2), bool),
               np.eye(3), 'x')
    s = make_sample(np.full((2, 3, 3), 255, np.uint8), np.ones((2, 3)), np.eye(3), 'y')
    batch = collate_samples([s, s])
    assert tuple(batch['rgb'].shape) == (2, 3, 2, 3) and float(batch['rgb'].max()) == 1.0
    assert tuple(batch['depth'].shape) == (2, 1, 2, 3) and batch['valid'].all()
    assert tuple(batch['K'].shape) == (2, 3, 3) and batch['name'] == ['y', 'y']
