"""
Offline bag processing (issue 7): small bags made from synthetic scenes, processed, read back.

Bags are written here with rosbags and rclpy directly (not with the code under test).  Every
check reads the output bag back: message counts, stamps and frame ids, depth against the
estimator run directly, bit-identity of two runs (every message's topic, bag time and raw
bytes, and the storage files themselves), metric depth from a sparse topic, and that bad
input leaves nothing behind.
"""

import hashlib
import os
from pathlib import Path
import signal
import subprocess
import sys
import textwrap
import threading

from builders import OracleEstimator, SCENE_FRAMES, SCENE_HEIGHT, SCENE_WIDTH
from builtin_interfaces.msg import Time
from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_model.estimator import DepthEstimator
from marigold_ros.bag_io import BagError, BagMessage, BagReader, serialize_canonical
from marigold_ros.bag_io import to_rclpy
from marigold_ros.bag_job import BagJob, format_summary
from marigold_ros.bag_processor import BagProcessor, main, process_bag
from marigold_ros.bag_topics import camera_namespace
from marigold_ros.conversions import image_to_depth, pointcloud2_from_depth
from marigold_ros.conversions import rgb_to_image
from marigold_ros.export import read_ply
from marigold_ros.geometry import quaternion_to_matrix
from marigold_ros.gil import MODEL_THREAD_SWITCH_INTERVAL_S
from marigold_ros.node_params import configs_from_parameters, NODE_NAME, OutputConfig
from marigold_ros.params import read_params_file
from marigold_ros.scale_recovery import ScaleInputError, ScaleRecoveryConfig
from marigold_ros.static_tf import matrix_to_quaternion, StaticTransforms
from msg_builders import frame_camera_info as _camera_info, frame_header as _header
from msg_builders import FRAME_ID, PLUGINS, STORE, T0
from msg_builders import frame_messages as _messages, frame_stamp as _stamp
from msg_builders import messages_by_topic as _by_topic, read_bag as _read
from msg_builders import write_bag as _write_bag, write_ros1_bag as _write_ros1_bag
import numpy as np
from PIL import Image as PILImage
import pytest
from rclpy.serialization import serialize_message
from rosbags.rosbag2 import Reader, Writer
from std_msgs.msg import Header

N_FRAMES, HEIGHT, WIDTH = SCENE_FRAMES, SCENE_HEIGHT, SCENE_WIDTH  # conftest scenes
PARAMS = """\
/**:
  ros__parameters:
    device: cpu
    batch_size: 3
    seed: 5
marigold_depth:
  ros__parameters:
    processing_resolution: 64
"""


# ------------------------------------------------------------------------------ fixtures


# scenes (six orbit frames) and one_torch_thread come from conftest.
pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def estimator(random_model_dir):
    """Load the random tiny model once for the module."""
    return DepthEstimator(EstimatorConfig(ModelConfig(model=random_model_dir, device='cpu')))


@pytest.fixture()
def params(tmp_path):
    """Write a params file in the node's format (both '/**' and node sections)."""
    path = tmp_path / 'depth.yaml'
    path.write_text(PARAMS)
    return str(path)


def _job(bag, out, params, **kwargs):
    return BagJob(input=bag, output=str(out), params=params, quiet=True, **kwargs)


def _files(folder):
    """Hash of every file under a folder (to prove it was not touched)."""
    folder = Path(folder)
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob('*') if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in paths}


def _leftovers(folder):
    """Staging folders left next to an output."""
    return sorted(p.name for p in Path(folder).iterdir() if '.partial-' in p.name)


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_outputs_match_input_and_estimator(tmp_path, scenes, estimator, params, storage):
    """Every frame out, same stamps and frame ids, depth equal to the estimator run directly."""
    bag = _write_bag(tmp_path / 'in', storage, _messages(scenes))
    before = _files(bag)
    summary = process_bag(_job(bag, tmp_path / 'out', params), estimator=estimator)
    assert _files(bag) == before  # the input is never touched
    assert (tmp_path / 'out' / 'out.mcap').is_file()  # mcap output by default
    assert summary.frames_in == summary.frames_out == N_FRAMES and not summary.errors

    topics = _by_topic(tmp_path / 'out')
    assert set(topics) == {'/cam/depth/relative', '/cam/depth/camera_info'}  # no scale
    for name, msgs in topics.items():
        assert len(msgs) == N_FRAMES, name
        assert [m.header.frame_id for m in msgs] == [FRAME_ID] * N_FRAMES
        assert [m.header.stamp for m in msgs] == [_header(i).stamp for i in range(N_FRAMES)]
    for msg, sample in zip(topics['/cam/depth/camera_info'], scenes):
        np.testing.assert_allclose(np.reshape(msg.k, (3, 3)), sample.K)

    # The bag processor's batches are 3 consecutive frames (batch_size in the params file).
    estimator.set_inference(InferenceConfig(processing_resolution=64, batch_size=3, seed=5))
    rgbs = [s.rgb for s in scenes]
    direct = estimator.estimate(rgbs[:3]) + estimator.estimate(rgbs[3:])
    for msg, result in zip(topics['/cam/depth/relative'], direct):
        assert msg.encoding == '32FC1'
        np.testing.assert_array_equal(image_to_depth(msg), result.depth)
    # Seeded per frame: one frame at a time gives the same depth up to float rounding.
    single = estimator.estimate(rgbs[4])
    np.testing.assert_allclose(image_to_depth(topics['/cam/depth/relative'][4]), single.depth,
                               atol=1e-4)


def _seed_reordering(names):
    """
    Return a PYTHONHASHSEED under which a set of ``names`` iterates in another order.

    With a few names, two random hash seeds give the same set order often (1 in 6 for
    three): this seed makes an output that follows set order differ for sure.
    """
    here = list(set(names))
    probe = f'print(list(set({names!r})) == {here!r})'
    for seed in range(1, 200):
        same = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONHASHSEED=str(seed)), check=True)
        if same.stdout.strip() == 'False':
            return str(seed)
    raise AssertionError(f'no hash seed reorders {names}')


def test_two_runs_are_bit_identical(tmp_path, scenes, estimator, params, random_model_dir):
    """
    Same input, parameters and seed: identical messages, bag times and storage files.

    Two runs in this process share one estimator and one heap; a third runs as a separate
    process (the console script's module, its own model load, another PYTHONHASHSEED), so
    uninitialised CDR padding, hash order or state kept between runs would show.
    """
    bag = _write_bag(tmp_path / 'in', 'sqlite3', _messages(scenes, sparse=True))
    outputs = []
    for run in ('a', 'b'):
        (tmp_path / run).mkdir()
        out = tmp_path / run / 'out'
        process_bag(_job(bag, out, params, copy_inputs=True, storage='sqlite3',
                         sparse_depth_topic='/cam/sparse_depth'), estimator=estimator)
        outputs.append(out)
    (tmp_path / 'c').mkdir()
    outputs.append(tmp_path / 'c' / 'out')
    topics = sorted({topic for topic, _, _ in _read(bag)})
    # The whole environment goes on (the PyPI rclpy re-executes Python with it); one torch
    # thread as this module's fixture sets in this process.
    env = dict(os.environ, PYTHONHASHSEED=_seed_reordering(topics), OMP_NUM_THREADS='1',
               MKL_NUM_THREADS='1')
    done = subprocess.run(
        [sys.executable, '-m', 'marigold_ros.bag_processor', bag, str(outputs[2]), '--params',
         params, '--model', random_model_dir, '--quiet', '--copy-inputs', '--storage',
         'sqlite3', '--sparse-depth-topic', '/cam/sparse_depth'],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    first, second, other = (_read(out) for out in outputs)
    assert first == second
    assert first == other
    counts = {}
    for topic, _, _ in first:
        counts[topic] = counts.get(topic, 0) + 1
    assert all(counts[t] == N_FRAMES for t in ('/cam/image_raw', '/cam/camera_info',
                                               '/cam/sparse_depth', '/cam/depth/relative'))
    # Whole files too: the writer stores no wall-clock time and the padding is zeroed.
    files = [{p.name: p.read_bytes() for p in out.iterdir()} for out in outputs]
    assert files[0] == files[1]
    assert files[0] == files[2]
    # The inputs are copied through byte for byte, at their bag times.
    copied = [m for m in first if not m[0].startswith('/cam/depth/')]
    assert sorted(copied) == sorted(_read(bag))


def test_copy_inputs_skips_a_topic_recorded_with_two_types(tmp_path, scenes, params, capsys):
    """A topic with two message types is not copied (and said so), the rest is."""
    messages = _messages(scenes)
    bag = tmp_path / 'in'
    with Writer(bag, version=9, storage_plugin=PLUGINS['mcap']) as writer:
        connections = {}
        for topic, msgtype, log_time, raw in messages:
            for name in (topic, '/mixed'):  # '/mixed' gets a connection per type
                if (name, msgtype) not in connections:
                    connections[name, msgtype] = writer.add_connection(name, msgtype,
                                                                       typestore=STORE)
            writer.write(connections[topic, msgtype], log_time, raw)
            writer.write(connections['/mixed', msgtype], log_time + 1, raw)
    bag = str(bag)
    summary = process_bag(_job(bag, tmp_path / 'out', params, copy_inputs=True),
                          estimator=OracleEstimator(scenes))
    assert summary.frames_out == N_FRAMES
    assert "not copied (recorded with several message types): ['/mixed']" in \
        capsys.readouterr().err
    topics = _by_topic(tmp_path / 'out')
    assert '/mixed' not in topics and len(topics['/cam/image_raw']) == N_FRAMES


def test_canonical_serialization_zeroes_rclpy_padding(scenes):
    """Output bytes do not depend on the CDR padding rclpy leaves uninitialised."""
    sample = scenes[0]
    points = np.dstack(list(np.meshgrid(np.arange(WIDTH), np.arange(HEIGHT))) + [sample.depth])
    messages = {'sensor_msgs/msg/Image': rgb_to_image(sample.rgb, _header(0)),
                'sensor_msgs/msg/CameraInfo': _camera_info(sample, 0),
                'sensor_msgs/msg/PointCloud2': pointcloud2_from_depth(
                    points.astype(np.float32), sample.rgb, _header(0))}
    for msgtype, msg in messages.items():
        canonical = bytes(serialize_canonical(msg, msgtype))
        # rosbags writes zero padding: re-serializing the rclpy bytes gives the same bytes.
        rebuilt = STORE.serialize_cdr(STORE.deserialize_cdr(serialize_message(msg), msgtype),
                                      msgtype)
        assert canonical == bytes(rebuilt), msgtype
        assert to_rclpy(BagMessage('/t', msgtype, 0, canonical)) == msg, msgtype


def test_written_messages_are_canonical_cdr(tmp_path, scenes, params):
    """
    Every message process_bag writes is rosbags' CDR of itself: zero padding throughout.

    rclpy's serialize_message leaves alignment padding uninitialised (heap garbage), so a
    writer that used it would store bytes that re-serialize differently here.
    """
    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes, sparse=True))
    process_bag(_job(bag, tmp_path / 'out', params, sparse_depth_topic='/cam/sparse_depth'),
                estimator=OracleEstimator(scenes))
    written = {}
    with Reader(tmp_path / 'out') as reader:
        for connection, _, raw in reader.messages():
            raw = bytes(raw)
            rebuilt = STORE.serialize_cdr(STORE.deserialize_cdr(raw, connection.msgtype),
                                          connection.msgtype)
            assert raw == bytes(rebuilt), connection.topic
            written[connection.topic] = written.get(connection.topic, 0) + 1
    assert len(written) >= 4 and set(written.values()) == {N_FRAMES}, written


def test_compressed_images_and_ros1_bags(tmp_path, scenes, estimator, params):
    """A CompressedImage (PNG) bag and a ROS 1 bag give what the rosbag2 Image bag gives."""
    reference = tmp_path / 'ref'
    process_bag(_job(_write_bag(tmp_path / 'in', 'mcap', _messages(scenes)), reference,
                     params), estimator=estimator)
    expected = _read(reference)

    packed = _write_bag(tmp_path / 'in_png', 'mcap', _messages(scenes, compressed=True))
    (tmp_path / 'png').mkdir()
    process_bag(_job(packed, tmp_path / 'png' / 'ref', params), estimator=estimator)
    # PNG is lossless and '/cam/image_raw/compressed' keeps the '/cam' namespace.
    assert _read(tmp_path / 'png' / 'ref') == expected

    ros1 = _write_ros1_bag(tmp_path / 'in.bag', _messages(scenes))
    (tmp_path / 'ros1').mkdir()
    process_bag(_job(ros1, tmp_path / 'ros1' / 'ref', params), estimator=estimator)
    assert _read(tmp_path / 'ros1' / 'ref') == expected

    # ROS 1 inputs copied through become ROS 2 messages (no header seq), ROS 2 type hashes.
    process_bag(_job(ros1, tmp_path / 'copied', params, copy_inputs=True),
                estimator=OracleEstimator(scenes))
    copied = _by_topic(tmp_path / 'copied')
    original = _by_topic(_write_bag(tmp_path / 'in2', 'sqlite3', _messages(scenes)))
    for topic in ('/cam/image_raw', '/cam/camera_info'):
        assert copied[topic] == original[topic]
    with BagReader(tmp_path / 'copied') as reader:
        assert reader.connection_info('/cam/camera_info')['rihs01'] == \
            STORE.hash_rihs01('sensor_msgs/msg/CameraInfo')


def test_sparse_depth_gives_metric_depth_clouds_and_export(tmp_path, scenes, params):
    """Sparse depth recorded late still matches; metric depth, clouds and files come out."""
    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes, sparse=True, late_s=0.8))
    export = tmp_path / 'export'
    summary = process_bag(_job(bag, tmp_path / 'out', params, export=str(export),
                               sparse_depth_topic='/cam/sparse_depth'),
                          estimator=OracleEstimator(scenes))
    assert summary.scale_status == {'ok': N_FRAMES}
    topics = _by_topic(tmp_path / 'out')
    assert {t: len(m) for t, m in topics.items()} == {
        f'/cam/depth/{name}': N_FRAMES
        for name in ('relative', 'image', 'camera_info', 'points')}
    for i, (msg, sample) in enumerate(zip(topics['/cam/depth/image'], scenes)):
        assert msg.header.stamp == _header(i).stamp
        metric = image_to_depth(msg)
        valid = sample.valid & np.isfinite(metric)
        assert valid.mean() > 0.95
        error = np.abs(metric[valid] - sample.depth[valid]) / sample.depth[valid]
        assert error.mean() < 0.01  # millimeter sparse depth, exact relative depth

    rows = (export / 'frames.csv').read_text().splitlines()
    assert len(rows) == N_FRAMES + 1 and all(',metric,' in row for row in rows[1:])
    depth_mm = np.asarray(PILImage.open(export / 'depth_000002.png'))
    assert depth_mm.dtype == np.uint16
    metric = image_to_depth(topics['/cam/depth/image'][2])
    finite = np.isfinite(metric)
    np.testing.assert_allclose(depth_mm[finite], np.rint(metric[finite] * 1000), atol=1)
    relative = np.asarray(PILImage.open(export / 'relative_000002.png'))
    np.testing.assert_allclose(
        relative, 1 + np.rint(image_to_depth(topics['/cam/depth/relative'][2]) * 65534), atol=1)
    assert np.asarray(PILImage.open(export / 'preview_000002.png')).shape == \
        (HEIGHT, WIDTH, 3)
    points, colors = read_ply(export / 'cloud_000002.ply')
    assert points.shape == (int(finite.sum()), 3) and colors.shape == points.shape
    np.testing.assert_allclose(np.sort(points[:, 2]), np.sort(metric[finite]), rtol=1e-6)
    assert not _leftovers(tmp_path)

    # Without enough look-ahead the first batch is processed before its late sparse depth
    # and camera info are read: those frames stay relative, without clouds.
    summary = process_bag(_job(bag, tmp_path / 'short', params, lookahead_s=0.05,
                               sparse_depth_topic='/cam/sparse_depth'),
                          estimator=OracleEstimator(scenes))
    assert summary.scale_status['relative'] >= 2
    # The summary says why those frames have no scale.
    assert summary.scale_reasons['no_sparse_input'] == summary.scale_status['relative']
    assert f"no_sparse_input {summary.scale_status['relative']}" in format_summary(summary)
    assert summary.notes['no_camera_info'] >= 2
    assert summary.topics_out['/cam/depth/points'] <= N_FRAMES - 2


def _tf_message(parent, child, translation, rotation):
    types = STORE.types
    t = types['geometry_msgs/msg/TransformStamped'](
        header=types['std_msgs/msg/Header'](
            stamp=types['builtin_interfaces/msg/Time'](sec=0, nanosec=0), frame_id=parent),
        child_frame_id=child,
        transform=types['geometry_msgs/msg/Transform'](
            translation=types['geometry_msgs/msg/Vector3'](*translation),
            rotation=types['geometry_msgs/msg/Quaternion'](*rotation)))
    return bytes(STORE.serialize_cdr(types['tf2_msgs/msg/TFMessage'](transforms=[t]),
                                     'tf2_msgs/msg/TFMessage'))


def test_lidar_with_recorded_static_transforms(tmp_path, scenes, params, capsys):
    """A LiDAR in another frame, placed by the bag's /tf_static chain, gives metric depth."""
    # base_link -> cam_optical and base_link -> lidar; the lidar frame is rotated 90 degrees
    # about z and shifted, so a wrong extrinsic cannot give the right scale.
    half = np.sqrt(0.5)
    cam_in_base = ((0.1, 0.0, 1.0), (0.0, 0.0, 0.0, 1.0))
    lidar_in_base = ((0.3, -0.2, 1.1), (0.0, 0.0, half, half))
    rot = quaternion_to_matrix(lidar_in_base[1])
    lidar_to_cam = np.asarray(lidar_in_base[0]) - np.asarray(cam_in_base[0])
    messages = _messages(scenes)
    messages.insert(0, ('/tf_static', 'tf2_msgs/msg/TFMessage', T0 - 1,
                        _tf_message('base_link', 'cam_optical', *cam_in_base)))
    messages.insert(1, ('/tf_static', 'tf2_msgs/msg/TFMessage', T0 - 1,
                        _tf_message('base_link', 'lidar', *lidar_in_base)))
    for i, sample in enumerate(scenes):
        fx, fy, cx, cy = sample.K[0, 0], sample.K[1, 1], sample.K[0, 2], sample.K[1, 2]
        v, u = np.mgrid[0:HEIGHT:4, 0:WIDTH:4]
        z = sample.depth[v, u]
        camera = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=-1).reshape(-1, 3)
        lidar = (camera - lidar_to_cam) @ rot  # p_lidar = R^T (p_cam - t)
        cloud = pointcloud2_from_depth(lidar.reshape(1, -1, 3).astype(np.float32), None,
                                       Header(frame_id='lidar', stamp=_header(i).stamp))
        messages.append(('/lidar/points', 'sensor_msgs/msg/PointCloud2', _stamp(i) + 9000,
                         serialize_message(cloud)))
    bag = _write_bag(tmp_path / 'in', 'mcap', sorted(messages, key=lambda m: m[2]))
    summary = process_bag(_job(bag, tmp_path / 'out', params, points_topic='/lidar/points'),
                          estimator=OracleEstimator(scenes))
    assert summary.scale_status == {'ok': N_FRAMES}
    assert summary.extrinsic.startswith('/tf_static (3 frames)')
    for msg, sample in zip(_by_topic(tmp_path / 'out')['/cam/depth/image'], scenes):
        metric = image_to_depth(msg)
        valid = sample.valid & np.isfinite(metric)
        assert np.mean(np.abs(metric[valid] - sample.depth[valid]) / sample.depth[valid]) < 0.01
    # The lookup itself: chained both ways, and quaternions round-trip.
    transforms = StaticTransforms([('base_link', 'cam_optical', *cam_in_base),
                                   ('base_link', 'lidar', *lidar_in_base)])
    translation, rotation = transforms('cam_optical', '/lidar', 0)
    np.testing.assert_allclose(translation, lidar_to_cam, atol=1e-12)
    np.testing.assert_allclose(quaternion_to_matrix(rotation), rot, atol=1e-12)
    for q in np.random.default_rng(0).normal(size=(20, 4)):
        back = matrix_to_quaternion(quaternion_to_matrix(q))
        np.testing.assert_allclose(back, q / np.linalg.norm(q) * np.sign(q[3]), atol=1e-9)
    with pytest.raises(ValueError, match='no static transform'):
        transforms('cam_optical', 'radar', 0)
    # Without the lidar's edge in /tf_static, the identity default of the extrinsic
    # parameters is not taken for a calibration: no transform (and no wrong scale).
    unlinked = [m for m in messages if m[3] != messages[1][3]]
    bag = _write_bag(tmp_path / 'unlinked', 'mcap', sorted(unlinked, key=lambda m: m[2]))
    processor = BagProcessor(_job(bag, tmp_path / 'out2', params))
    with BagReader(bag) as reader:
        lookup = processor._transforms(reader, ScaleRecoveryConfig())
    with pytest.raises(ScaleInputError, match='no static transform'):
        lookup('cam_optical', 'lidar', 0)
    calibrated = ScaleRecoveryConfig(extrinsic_translation=(0.0, 0.0, 0.1))
    with BagReader(bag) as reader:
        lookup = processor._transforms(reader, calibrated)
    assert tuple(lookup('cam_optical', 'lidar', 0)[0]) == (0.0, 0.0, 0.1)  # given: used
    # Motion compensation needs live tf2: offline it is refused aloud, not silently.
    capsys.readouterr()
    with BagReader(bag) as reader:
        processor._transforms(reader, ScaleRecoveryConfig(fixed_frame='odom'))
    assert "fixed_frame 'odom' is not used offline" in capsys.readouterr().err


def test_static_camera_info_needs_use_latest(tmp_path, scenes, params):
    """One camera_info with an unrelated stamp: matched only with camera_info_use_latest."""
    messages = [m for m in _messages(scenes) if m[0] != '/cam/camera_info']
    info = _camera_info(scenes[0], 0)
    info.header.stamp = Time(sec=1)
    messages.insert(0, ('/cam/camera_info', 'sensor_msgs/msg/CameraInfo', T0 - 1,
                        serialize_message(info)))
    bag = _write_bag(tmp_path / 'in', 'mcap', messages)
    summary = process_bag(_job(bag, tmp_path / 'a', params), estimator=OracleEstimator(scenes))
    assert summary.notes['no_camera_info'] == N_FRAMES
    assert 'camera_info_use_latest' in format_summary(summary)
    latest = tmp_path / 'latest.yaml'
    latest.write_text(PARAMS + '    camera_info_use_latest: true\n')
    summary = process_bag(_job(bag, tmp_path / 'b', str(latest)),
                          estimator=OracleEstimator(scenes))
    assert summary.topics_out['/cam/depth/camera_info'] == N_FRAMES
    assert 'no_camera_info' not in summary.notes
    # A new static camera_info recorded after frame 2 serves the frames after it only (the
    # live node can only fall back to one received before the image).
    refocused = _camera_info(scenes[0], 0)
    refocused.header.stamp = Time(sec=2)
    refocused.k[0] *= 2
    messages.insert(0, ('/cam/camera_info', 'sensor_msgs/msg/CameraInfo', _stamp(2) + 5500,
                        serialize_message(refocused)))
    bag = _write_bag(tmp_path / 'in2', 'mcap', sorted(messages, key=lambda m: m[2]))
    process_bag(_job(bag, tmp_path / 'c', str(latest)), estimator=OracleEstimator(scenes))
    focal = [m.k[0] for m in _by_topic(tmp_path / 'c')['/cam/depth/camera_info']]
    assert focal == [focal[0]] * 3 + [2 * focal[0]] * (N_FRAMES - 3)


def test_topic_choice_and_errors_leave_no_output(tmp_path, scenes, params):
    """Several or missing image topics: the error lists the image topics; nothing written."""
    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes, second_camera=True))
    out = tmp_path / 'out'
    oracle = OracleEstimator(scenes)
    with pytest.raises(BagError, match='2 image topics') as error:
        process_bag(_job(bag, out, params), estimator=oracle)
    assert '/cam/image_raw' in str(error.value) and '/left/image_raw' in str(error.value)
    with pytest.raises(BagError, match="'/nope'") as error:
        process_bag(_job(bag, out, params, image_topic='/nope'), estimator=oracle)
    assert '/cam/image_raw' in str(error.value) and '/left/image_raw' in str(error.value)
    with pytest.raises(BagError, match='sparse depth topic'):
        process_bag(_job(bag, out, params, image_topic='/left/image_raw',
                         sparse_depth_topic='/cam/sparse_depth'), estimator=oracle)
    with pytest.raises(BagError, match='carries sensor_msgs/msg/CameraInfo'):
        process_bag(_job(bag, out, params, image_topic='/cam/camera_info'), estimator=oracle)
    assert oracle.calls == 0 and not out.exists() and not _leftovers(tmp_path)
    # Named, the second camera works and its outputs go to its own namespace.
    summary = process_bag(_job(bag, out, params, image_topic='/left/image_raw'),
                          estimator=oracle)
    assert summary.topics_out == {'/left/depth/relative': N_FRAMES}
    assert camera_namespace('/a/b/image/compressed') == '/a/b'


def test_bad_frames_are_reported_and_strict_stops(tmp_path, scenes, params, capsys):
    """An undecodable image is skipped with a message naming it; --strict writes nothing."""
    messages = _messages(scenes)
    broken = rgb_to_image(scenes[2].rgb, _header(2))
    broken.data = broken.data[:100]  # shorter than step * height
    images = [i for i, m in enumerate(messages) if m[0] == '/cam/image_raw']
    messages[images[2]] = messages[images[2]][:3] + (serialize_message(broken),)
    bag = _write_bag(tmp_path / 'in', 'mcap', messages)
    summary = process_bag(_job(bag, tmp_path / 'out', params, export=str(tmp_path / 'x')),
                          estimator=OracleEstimator(scenes))
    assert summary.frames_in == N_FRAMES and summary.frames_out == N_FRAMES - 1
    assert summary.errors == {'truncated': 1}
    assert 'frame 2' in capsys.readouterr().err
    _check_failed_frame(tmp_path, bag, params, scenes, 2, 'truncated')


def _check_failed_frame(tmp_path, bag, params, scenes, failed, reason, strict_error=None):
    """Check the output lacks the failed frame, frames.csv names it, --strict writes nothing."""
    stamps = [m.header.stamp for m in _by_topic(tmp_path / 'out')['/cam/depth/relative']]
    assert stamps == [_header(i).stamp for i in range(N_FRAMES) if i != failed]
    rows = (tmp_path / 'x' / 'frames.csv').read_text().splitlines()
    assert rows[failed + 1].startswith(f'{failed},') and f'error:{reason}' in rows[failed + 1]
    with pytest.raises(BagError, match=strict_error or reason):
        process_bag(_job(bag, tmp_path / 'strict', params, strict=True),
                    estimator=OracleEstimator(scenes))
    assert not (tmp_path / 'strict').exists() and not _leftovers(tmp_path)


def test_undeserializable_messages_cost_their_frame_only(tmp_path, scenes, params, capsys):
    """A cut CDR message: its frame fails (in order), a bad camera info is skipped."""
    messages = _messages(scenes)
    images = [i for i, m in enumerate(messages) if m[0] == '/cam/image_raw']
    infos = [i for i, m in enumerate(messages) if m[0] == '/cam/camera_info']
    for position in (images[1], infos[3]):
        messages[position] = messages[position][:3] + (messages[position][3][:40],)
    bag = _write_bag(tmp_path / 'in', 'mcap', messages)
    summary = process_bag(_job(bag, tmp_path / 'out', params, export=str(tmp_path / 'x')),
                          estimator=OracleEstimator(scenes))
    assert summary.frames_in == N_FRAMES and summary.frames_out == N_FRAMES - 1
    assert summary.errors == {'corrupt': 1}
    assert summary.problems == {'corrupt_/cam/camera_info': 1}
    assert 'frame 1' in capsys.readouterr().err
    infos = _by_topic(tmp_path / 'out')['/cam/depth/camera_info']
    assert len(infos) == N_FRAMES - 2  # frame 3 has no camera info, frame 1 no depth
    _check_failed_frame(tmp_path, bag, params, scenes, 1, 'corrupt', 'cannot deserialize')


QOS_PROFILE = """
      - history: keep_last
        depth: 10
        reliability: best_effort
        durability: volatile
        deadline: {sec: 9223372036, nsec: 854775807}
        lifespan: {sec: 9223372036, nsec: 854775807}
        liveliness: automatic
        liveliness_lease_duration: {sec: 9223372036, nsec: 854775807}
        avoid_ros_namespace_conventions: false"""


def test_metadata_hiding_a_topic_falls_back_to_the_storage_file(tmp_path, scenes, params):
    """Read a topic that metadata.yaml hides (its QoS differs from the storage file)."""
    bag = Path(_write_bag(tmp_path / 'in', 'mcap', _messages(scenes)))
    metadata = (bag / 'metadata.yaml').read_text()
    hidden = metadata.replace(
        'offered_qos_profiles: []\n      serialization_format: cdr\n      type: '
        'sensor_msgs/msg/Image', 'offered_qos_profiles:' + QOS_PROFILE + '\n      '
        'serialization_format: cdr\n      type: sensor_msgs/msg/Image')
    assert hidden != metadata
    (bag / 'metadata.yaml').write_text(hidden)
    summary = process_bag(_job(str(bag), tmp_path / 'out', params),
                          estimator=OracleEstimator(scenes))
    assert summary.frames_out == N_FRAMES


def test_corrupt_and_truncated_bags_give_clear_errors(tmp_path, scenes, params):
    """Garbage, a cut storage file and a missing bag raise BagError; nothing is written."""
    good = Path(_write_bag(tmp_path / 'good', 'mcap', _messages(scenes)))
    garbage = tmp_path / 'garbage.mcap'
    garbage.write_bytes(b'\x89MCAP0\r\n' + bytes(range(256)) * 4)
    cut = tmp_path / 'cut'
    cut.mkdir()
    (cut / 'metadata.yaml').write_text((good / 'metadata.yaml').read_text().replace(
        'good.mcap', 'cut.mcap'))
    data = (good / 'good.mcap').read_bytes()
    (cut / 'cut.mcap').write_bytes(data[:len(data) // 2])
    sqlite = Path(_write_bag(tmp_path / 'sql', 'sqlite3', _messages(scenes)))
    (sqlite / 'sql.db3').write_bytes((sqlite / 'sql.db3').read_bytes()[:3000])
    # A readable bag whose fifth image message is cut short: found after a batch was
    # written; without --strict only that frame fails (see the test above).
    messages = _messages(scenes)
    images = [i for i, m in enumerate(messages) if m[0] == '/cam/image_raw']
    messages[images[4]] = messages[images[4]][:3] + (messages[images[4]][3][:60],)
    damaged = _write_bag(tmp_path / 'damaged', 'mcap', messages)
    cases = {garbage: 'garbage.mcap', cut: 'cut', sqlite: 'sql', damaged: '/cam/image_raw',
             tmp_path / 'missing': 'does not exist'}
    out = tmp_path / 'out'
    for bag, name in cases.items():
        oracle = OracleEstimator(scenes)
        with pytest.raises(BagError, match=name) as error:
            process_bag(_job(str(bag), out, params, strict=bag == damaged), estimator=oracle)
        assert error.value.reason in ('unreadable', 'corrupt', 'missing'), bag
        assert not out.exists() and not _leftovers(tmp_path), bag
    assert oracle.calls == 0  # the missing bag: refused before any work


def test_interrupt_and_existing_output_leave_no_half_bag(tmp_path, scenes, params):
    """Ctrl-C in the middle removes the partial bag and export; an output is not replaced."""
    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes))

    class Interrupting(OracleEstimator):
        def estimate(self, frames, keys=None):
            if self.calls == 1:
                raise KeyboardInterrupt
            return super().estimate(frames, keys)

    out = tmp_path / 'out'
    with pytest.raises(KeyboardInterrupt):
        process_bag(_job(bag, out, params, export=str(tmp_path / 'x')),
                    estimator=Interrupting(scenes))
    assert not out.exists() and not (tmp_path / 'x').exists() and not _leftovers(tmp_path)

    out.mkdir()
    (out / 'keep').write_text('mine')
    with pytest.raises(BagError, match='already exists'):
        process_bag(_job(bag, out, params), estimator=OracleEstimator(scenes))
    assert (out / 'keep').read_text() == 'mine'
    process_bag(_job(bag, out, params, overwrite=True), estimator=OracleEstimator(scenes))
    assert not (out / 'keep').exists() and len(_read(out)) == 2 * N_FRAMES


def test_interrupt_while_moving_the_output_into_place_waits(tmp_path, scenes, params,
                                                            monkeypatch, capsys):
    """Ctrl-C between moving the export and the bag into place cannot leave only one."""
    import contextlib
    from marigold_ros import bag_processor
    from marigold_ros.bag_writer import AtomicBagWriter
    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes))
    commit = AtomicBagWriter.commit
    deferred_interrupts = bag_processor.deferred_interrupts
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs as a background job
    handled = threading.Event()
    raised = []

    @contextlib.contextmanager
    def noting_deferred_interrupts():
        # Runs on the main thread: the real deferral, its SIGINT handler wrapped so the
        # commit below knows when the main thread has taken the signal.
        with deferred_interrupts() as received:
            holding = signal.getsignal(signal.SIGINT)

            def noting(number, frame):
                try:
                    holding(number, frame)
                except KeyboardInterrupt:  # not held back: fail the test, not pytest
                    raised.append(number)
                finally:
                    handled.set()
            signal.signal(signal.SIGINT, noting)
            try:
                yield received
            finally:
                signal.signal(signal.SIGINT, holding)

    def interrupted_commit(writer):
        # On the writer's thread, the export already in place: Ctrl-C reaches the main
        # thread (waiting for this call), which runs the handler; only then does the bag
        # move.  Waiting on the handler's event replaces a fixed sleep.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        assert handled.wait(timeout=60), 'the main thread did not take the SIGINT'
        return commit(writer)

    monkeypatch.setattr(bag_processor, 'deferred_interrupts', noting_deferred_interrupts)
    monkeypatch.setattr(AtomicBagWriter, 'commit', interrupted_commit)
    out = tmp_path / 'out'
    summary = process_bag(_job(bag, out, params, export=str(tmp_path / 'x')),
                          estimator=OracleEstimator(scenes))
    assert handled.is_set() and not raised, 'SIGINT was not held back while moving'
    assert summary.output == str(out) and len(_read(out)) == 2 * N_FRAMES
    assert (tmp_path / 'x').is_dir() and not _leftovers(tmp_path)
    assert 'the output is complete' in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_outputs_that_would_touch_the_input_are_refused(tmp_path, scenes, params):
    """--overwrite replaces an output folder: one holding the input (or the export) is refused."""
    folder = tmp_path / 'drive'
    folder.mkdir()
    bag = Path(_write_bag(folder / 'in', 'mcap', _messages(scenes)))
    before = _files(folder)
    for output, export in ((folder, None), (bag, None), (bag / 'sub', None),
                           (tmp_path / 'out', folder), (tmp_path / 'out', bag / 'x'),
                           (tmp_path / 'out', tmp_path / 'out' / 'frames'),
                           (tmp_path / 'both', tmp_path / 'both')):
        job = _job(str(bag), output, params, overwrite=True,
                   export=None if export is None else str(export))
        with pytest.raises(BagError, match='must not be the input|must be separate'):
            process_bag(job, estimator=OracleEstimator(scenes))
        assert _files(folder) == before
    assert not (tmp_path / 'out').exists() and not _leftovers(tmp_path)


def test_exported_relative_depth_keeps_the_nearest_point_apart_from_holes():
    """Relative 0 is the nearest point: 1 in the PNG and coloured; only NaN is 0 / black."""
    from marigold_ros.export import colorize, relative_to_png16
    relative = np.array([[0.0, 0.5, 1.0, np.nan]])
    assert relative_to_png16(relative).tolist() == [[1, 32768, 65535, 0]]
    colours = colorize(relative, relative=True)
    assert colours[0, 0].any() and not colours[0, 3].any()


def test_failing_bag_close_leaves_neither_bag_nor_export(tmp_path, scenes, params,
                                                         monkeypatch):
    """The bag is closed before anything moves into place: a full disk leaves nothing."""
    from marigold_ros.mcap_pieces import PiecewiseWriter

    def full_disk(self):
        raise OSError(28, 'No space left on device')

    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes))
    monkeypatch.setattr(PiecewiseWriter, 'close', full_disk)
    with pytest.raises(OSError, match='No space'):
        process_bag(_job(bag, tmp_path / 'out', params, export=str(tmp_path / 'x')),
                    estimator=OracleEstimator(scenes))
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'x').exists()
    assert not _leftovers(tmp_path)


def test_stages_of_killed_runs_are_removed_by_the_next_run(tmp_path, scenes, params):
    """A SIGKILLed run's staging folders go with the next run; a live process's stay."""
    from marigold_ros.bag_writer import staging_path
    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes))
    dead = subprocess.Popen(['true'])
    dead.wait()
    stages = {}
    for folder in ('out', 'x'):
        ours = staging_path(tmp_path / folder)
        for who, pid in (('dead', dead.pid), ('live', os.getppid())):
            stages[folder, who] = ours.with_name(ours.name.rsplit('-', 1)[0] + f'-{pid}')
            stages[folder, who].mkdir()
    old_export = stages['x', 'dead'].with_name(stages['x', 'dead'].name + '.old')
    old_export.mkdir()
    process_bag(_job(bag, tmp_path / 'out', params, export=str(tmp_path / 'x')),
                estimator=OracleEstimator(scenes))
    assert not old_export.exists()
    assert {key for key, path in stages.items() if path.exists()} == {('out', 'live'),
                                                                      ('x', 'live')}


def test_command_line(tmp_path, scenes, params, random_model_dir, capsys):
    """The console script: summary on success, exit 1 and a clear message on errors."""
    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes))
    out = str(tmp_path / 'out')
    argv = [bag, out, '--params', params, '--model', random_model_dir, '--quiet',
            '--storage', 'sqlite3', '--no-points']
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert 'frames: 6 in on /cam/image_raw, 6 with depth' in report
    assert '/cam/depth/relative: 6' in report and 'ms per frame' in report
    assert (tmp_path / 'out' / 'out.db3').is_file()
    assert main(argv) == 1 and 'already exists' in capsys.readouterr().err
    assert main([bag, str(tmp_path / 'o2'), '--image-topic', '/x', '--quiet']) == 1
    assert '/cam/image_raw' in capsys.readouterr().err and not (tmp_path / 'o2').exists()


def test_sparse_guidance_from_the_command_line(tmp_path, scenes, params, capsys):
    """--guidance: every frame with sparse depth gets the guided metric depth, in meters."""
    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes, sparse=True))
    base = [bag, '--params', params, '--model', 'bundled:marigold-tiny', '--quiet',
            '--sparse-depth-topic', '/cam/sparse_depth', '--no-points']
    guided = base + ['--guidance', '--guidance-denoising-steps', '2',
                     '--guidance-iterations-per-step', '1', '--guidance-robust-weights', 'true']
    assert main([guided[0], str(tmp_path / 'guided')] + guided[1:]) == 0
    report = capsys.readouterr().out
    assert f'scale: ok {N_FRAMES}' in report and '(ok, guided)' in report
    topics = _by_topic(tmp_path / 'guided')
    assert len(topics['/cam/depth/image']) == N_FRAMES
    errors = []
    for msg, relative, sample in zip(topics['/cam/depth/image'], topics['/cam/depth/relative'],
                                     scenes):
        metric = image_to_depth(msg)
        valid = sample.valid & np.isfinite(metric)
        assert valid.mean() > 0.9
        errors.append(np.median(np.abs(metric[valid] - sample.depth[valid])
                                / sample.depth[valid]))
        # Meters are an affine map of the published (guided) relative depth.
        rel = image_to_depth(relative)[valid]
        slope, intercept = np.polyfit(rel, metric[valid], 1)
        np.testing.assert_allclose(metric[valid], slope * rel + intercept, rtol=1e-3,
                                   atol=1e-3)
    # Meters of the scene, not relative units (those would be off by 0.6 or more); 2 steps x 1
    # update gave at most 0.29 with the v4 bundled model (v3: 0.25, v2: 0.33).
    assert max(errors) < 0.4
    # Guidance off on the same bag: another depth (the plain path), and a bad setting is
    # refused before anything is written.
    assert main([bag, str(tmp_path / 'plain')] + base[1:]) == 0
    plain = _by_topic(tmp_path / 'plain')
    assert [m.data for m in plain['/cam/depth/relative']] != \
        [m.data for m in topics['/cam/depth/relative']]
    assert main([bag, str(tmp_path / 'bad')] + guided[1:] + ['--guidance-latent-lr', '-1']) == 1
    assert 'latent_lr' in capsys.readouterr().err and not (tmp_path / 'bad').exists()


def test_params_file_maps_onto_the_node_configs(tmp_path, params):
    """Node sections merge over '/**', nested names are dotted, unknown names are refused."""
    values = read_params_file(params, NODE_NAME)
    assert values == {'device': 'cpu', 'batch_size': 3, 'seed': 5,
                      'processing_resolution': 64}
    configs = configs_from_parameters({**values, 'scale_recovery.min_points': 30,
                                       'fixed_scale': 2})
    assert configs[ModelConfig].device == 'cpu'
    assert configs[InferenceConfig].batch_size == 3
    assert configs[OutputConfig].fixed_scale == 2.0
    assert configs[ScaleRecoveryConfig].min_points == 30
    with pytest.raises(ValueError, match='batch_sise'):
        configs_from_parameters({'batch_sise': 3})
    # rclpy's own parameters, which a launch file's params may set for the live node.
    shared = configs_from_parameters({'use_sim_time': True, 'batch_size': 2,
                                      'qos_overrides./tf.subscription.depth': 5})
    assert shared[InferenceConfig].batch_size == 2
    with pytest.raises(ValueError, match='ensemble_size'):
        configs_from_parameters({'ensemble_size': 0})
    nested = tmp_path / 'nested.yaml'
    nested.write_text('marigold_depth:\n  ros__parameters:\n    scale_recovery:\n'
                      '      source: points\n')
    assert read_params_file(str(nested), NODE_NAME) == {'scale_recovery.source': 'points'}
    nested.write_text('other_node:\n  ros__parameters: {}\n')
    with pytest.raises(ValueError, match='marigold_depth'):
        read_params_file(str(nested), NODE_NAME)
    # Keys as rcl takes them for the live node, and floats as rcl reads them.
    section = 'ros__parameters:\n  ensemble_tol: 1e-4\n  fixed_scale: 2\n'
    for key in ('/camera/marigold_depth', '/**/marigold_depth', 'camera:\n  marigold_depth',
                '/camera/marigold_*'):
        depth = key.count('\n') + 1
        nested.write_text(f'{key}:\n' + textwrap.indent(section, '  ' * depth))
        values = read_params_file(str(nested), NODE_NAME)
        assert values == {'ensemble_tol': 1e-4, 'fixed_scale': 2}, key
        assert configs_from_parameters(values)[InferenceConfig].ensemble_tol == 1e-4
    nested.write_text('/**:\n  ros__parameters:\n    seed: 1\n    batch_size: 2\n'
                      '/camera/marigold_depth:\n  ros__parameters:\n    seed: 2\n')
    assert read_params_file(str(nested), NODE_NAME) == {'seed': 2, 'batch_size': 2}
    for other in ('/right/marigold_depth', '/right/*'):
        nested.write_text('/left/marigold_depth:\n  ros__parameters: {seed: 1}\n'
                          f'{other}:\n  ros__parameters: {{seed: 2}}\n')
        with pytest.raises(ValueError, match='several namespaces'):
            read_params_file(str(nested), NODE_NAME)
    # A namespace wildcard applies to every namespace, before the concrete one.
    nested.write_text('/a/marigold_depth:\n  ros__parameters: {seed: 1}\n'
                      '/*/marigold_depth:\n  ros__parameters: {seed: 2, batch_size: 4}\n')
    assert read_params_file(str(nested), NODE_NAME) == {'seed': 1, 'batch_size': 4}


def test_model_thread_gets_the_gil_back_quickly(tmp_path, scenes, params):
    """The model runs under a 1 ms GIL switch interval; the caller's is restored after."""
    seen = []

    class Recording(OracleEstimator):
        def estimate(self, frames, keys=None):
            seen.append(sys.getswitchinterval())
            return super().estimate(frames, keys)

    before = sys.getswitchinterval()
    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes))
    process_bag(_job(bag, tmp_path / 'out', params), estimator=Recording(scenes))
    assert seen and all(value == MODEL_THREAD_SWITCH_INTERVAL_S for value in seen)
    assert MODEL_THREAD_SWITCH_INTERVAL_S < before == sys.getswitchinterval()


def test_sparse_guidance_beats_the_best_global_fit(tmp_path, scenes, params):
    """
    At the default settings guided metric depth is closer to the truth than any affine fit.

    The sparse depth is every 4th pixel of the truth.  The plain prediction scored after the
    least-squares scale and shift against the full truth (what no scale recovery can beat)
    had AbsRel 0.231 on these frames; the guided depth 0.195 with the v4 bundled model (v3:
    0.236 against 0.247; v2: 0.224 against 0.244; the first model: 0.186).
    """
    bag = _write_bag(tmp_path / 'in', 'mcap', _messages(scenes, sparse=True))
    base = [bag, '--params', params, '--model', 'bundled:marigold-tiny', '--quiet',
            '--sparse-depth-topic', '/cam/sparse_depth', '--no-points']
    assert main([base[0], str(tmp_path / 'plain')] + base[1:]) == 0
    assert main([base[0], str(tmp_path / 'guided')] + base[1:] + ['--guidance']) == 0
    plain, guided = (_by_topic(tmp_path / name) for name in ('plain', 'guided'))
    best_fit, guided_error = [], []
    for relative, metric, sample in zip(plain['/cam/depth/relative'],
                                        guided['/cam/depth/image'], scenes):
        valid, truth = sample.valid, sample.depth[sample.valid]
        rel = image_to_depth(relative)[valid]
        slope, intercept = np.polyfit(rel, truth, 1)
        best_fit.append(np.mean(np.abs(slope * rel + intercept - truth) / truth))
        depth = image_to_depth(metric)[valid]
        assert np.isfinite(depth).all()
        guided_error.append(np.mean(np.abs(depth - truth) / truth))
    assert len(guided_error) == N_FRAMES
    assert np.mean(guided_error) < 0.95 * np.mean(best_fit)
