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

from builders import orbit_scenes
from marigold_model.config import BUNDLED_TINY_MODEL
from marigold_ros.bag_job import BagJob
from marigold_ros.bag_processor import process_bag
from msg_builders import frame_messages, write_bag
from rosbags.rosbag2 import Reader

REFERENCE = Path(__file__).resolve().parent / 'data' / 'bag_reference.json'
N_FRAMES, HEIGHT, WIDTH = 6, 48, 64
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


def _write_input(path):
    scenes = orbit_scenes(N_FRAMES, seed=3, height=HEIGHT, width=WIDTH)
    return write_bag(path, 'mcap', frame_messages(scenes, sparse=True, sparse_step=3))


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
