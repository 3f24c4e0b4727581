"""
process_bag output stays byte-identical across refactors (issue 13, regression fixture).

A small deterministic bag (six synthetic frames, camera info, sparse depth) goes through
process_bag with the bundled tiny model, ensemble 2, batch 2, every output on (relative,
metric, uncertainty, camera info, points).  The digest of every output topic (bag time and
raw bytes of each message, in order) is compared with test/data/bag_reference.json, which
was made by the code before the restructure; a failure names the topics that changed.

The digests hold for one software stack and CPU (torch kernels may round differently
elsewhere): regenerate them on purpose with MARIGOLD_UPDATE_BAG_REFERENCE=1.
"""

import hashlib
import json
import os
from pathlib import Path

from builtin_interfaces.msg import Time
from marigold_model.config import BUNDLED_TINY_MODEL
from marigold_model.data.synthetic import render_sequence
from marigold_ros.bag_processor import BagJob, process_bag
from marigold_ros.conversions import rgb_to_image
import numpy as np
import pytest
from rclpy.serialization import serialize_message
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import get_typestore, Stores
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Header
import torch

REFERENCE = Path(__file__).resolve().parent / 'data' / 'bag_reference.json'
N_FRAMES, HEIGHT, WIDTH = 6, 48, 64
T0, PERIOD = 100 * 10 ** 9, 10 ** 8
PARAMS = f"""\
/**:
  ros__parameters:
    model: {BUNDLED_TINY_MODEL}
    device: cpu
    batch_size: 2
    ensemble_size: 2
    seed: 11
    processing_resolution: 64
    max_depth: 6.0
"""


def _header(i):
    ns = T0 + i * PERIOD
    return Header(frame_id='cam_optical', stamp=Time(sec=ns // 10 ** 9, nanosec=ns % 10 ** 9))


def _camera_info(sample, i):
    info = CameraInfo(header=_header(i), width=WIDTH, height=HEIGHT,
                      distortion_model='plumb_bob', d=[0.0] * 5)
    info.k = sample.K.reshape(-1).tolist()
    info.r = np.eye(3).reshape(-1).tolist()
    projection = np.zeros((3, 4))
    projection[:, :3] = sample.K
    info.p = projection.reshape(-1).tolist()
    return info


def _sparse(sample, i):
    mm = np.zeros(sample.depth.shape, np.uint16)
    grid = np.zeros(sample.depth.shape, bool)
    grid[::3, ::3] = True
    grid &= sample.valid
    mm[grid] = np.rint(sample.depth[grid] * 1000.0).astype(np.uint16)
    msg = rgb_to_image(mm, _header(i), 'mono16')
    msg.encoding = '16UC1'
    return msg


def _write_input(path):
    store = get_typestore(Stores.ROS2_KILTED)
    scenes = render_sequence(np.random.default_rng(3), N_FRAMES, height=HEIGHT, width=WIDTH,
                             motion='orbit')
    messages = []
    for i, sample in enumerate(scenes):
        stamp = T0 + i * PERIOD
        messages += [
            ('/cam/image_raw', 'sensor_msgs/msg/Image', stamp + 5000,
             serialize_message(rgb_to_image(sample.rgb, _header(i)))),
            ('/cam/camera_info', 'sensor_msgs/msg/CameraInfo', stamp + 6000,
             serialize_message(_camera_info(sample, i))),
            ('/cam/sparse_depth', 'sensor_msgs/msg/Image', stamp + 7000,
             serialize_message(_sparse(sample, i)))]
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        for topic, msgtype, log_time, raw in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(connections[topic], log_time, raw)
    return str(path)


def _digests(folder):
    """Per topic: message count and sha256 over (bag time, raw bytes) of its messages."""
    hashes, counts = {}, {}
    with Reader(folder) as reader:
        for connection, log_time, raw in reader.messages():
            digest = hashes.setdefault(connection.topic, hashlib.sha256())
            digest.update(log_time.to_bytes(8, 'little') + len(raw).to_bytes(8, 'little'))
            digest.update(bytes(raw))
            counts[connection.topic] = counts.get(connection.topic, 0) + 1
    return {topic: {'messages': counts[topic], 'sha256': hashes[topic].hexdigest()}
            for topic in sorted(hashes)}


@pytest.fixture()
def one_torch_thread():
    """Run the model on one thread (restored afterwards): the reference was made so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_output_bag_matches_reference(tmp_path, one_torch_thread):
    """Every output topic's messages (bag time and bytes) are those of the reference run."""
    bag = _write_input(tmp_path / 'in')
    params = tmp_path / 'depth.yaml'
    params.write_text(PARAMS)
    summary = process_bag(BagJob(input=bag, output=str(tmp_path / 'out'), params=str(params),
                                 sparse_depth_topic='/cam/sparse_depth', quiet=True))
    assert summary.frames_in == summary.frames_out == N_FRAMES and not summary.errors
    topics = _digests(tmp_path / 'out')
    # Every output is on, so a change that drops one shows as a missing topic.
    assert set(topics) == {f'/cam/depth/{name}' for name in
                           ('relative', 'image', 'uncertainty', 'camera_info', 'points')}
    for name in ('relative', 'uncertainty', 'camera_info'):
        assert topics[f'/cam/depth/{name}']['messages'] == N_FRAMES, name
    # The scale is tracked from the second frame on: metric outputs for the later frames.
    for name in ('image', 'points'):
        assert 0 < topics[f'/cam/depth/{name}']['messages'] < N_FRAMES, name
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((tmp_path / 'out').iterdir()) if p.suffix == '.mcap'}
    current = {'topics': topics, 'files': files}
    if os.environ.get('MARIGOLD_UPDATE_BAG_REFERENCE') == '1':
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(current, indent=2, sort_keys=True) + '\n')
    reference = json.loads(REFERENCE.read_text())
    changed = sorted(topic for topic in set(reference['topics']) | set(topics)
                     if reference['topics'].get(topic) != topics.get(topic))
    assert not changed, f'output topics differ from the reference run: {changed}'
    assert files == reference['files']
