"""
The depth node in a ROS graph, in-process and as a separate process.

In-process: publisher -> node -> subscribers on one executor.  One test runs the console
script in its own process as a user would.

The model is the bundled tiny model when it exists, else a random one (the node's behaviour
does not depend on the weights).  Images are 64x48 at processing resolution 32 so that a
model call stays well below a second on a busy CPU.
"""

from collections import defaultdict
import itertools
import math
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_ros.conversions import image_to_depth, pointcloud2_to_xyz, rgb_to_compressed
from marigold_ros.conversions import rgb_to_image
from marigold_ros.depth_node import DepthLifecycleNode, DepthNode, warmup_frame
from marigold_ros.diagnostics import DiagnosticsCollector, KeyedThrottle, Percentiles
from marigold_ros.diagnostics import RateMeter
from marigold_ros.geometry import CameraModel
from marigold_ros.node_params import OUTPUT_NAMES
from marigold_ros.node_threads import Handoff
from marigold_ros.stamp_matcher import stamp_to_ns
import numpy as np
import pytest
import rclpy
from rclpy.duration import Duration
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / 'marigold_model' / 'models' / 'marigold-tiny' / 'model_index.json'
H, W = 48, 64
K = [[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]]
FRAME = 'test_camera_optical'
TIMEOUT = 60.0
_names = itertools.count()


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope='module')
def model_path(random_model_dir):
    """Return the bundled tiny model when present, else the random test model."""
    return 'bundled:marigold-tiny' if BUNDLED.is_file() else random_model_dir


@pytest.fixture(scope='module')
def estimator(model_path):
    """Load the model once for the module (the node gets it through a factory)."""
    from marigold_model.estimator import DepthEstimator
    return DepthEstimator(EstimatorConfig(ModelConfig(model=model_path, device='cpu'),
                                          InferenceConfig(processing_resolution=32)))


class Spy:
    """
    Wrap the shared estimator: record every call and its settings, optionally held.

    A call waits for ``gate`` (a threading.Event) when one is given: the test decides when
    the model call ends, so "frames arrive while the model is busy" holds on any machine.
    """

    def __init__(self, inner, config, delay=0.0, gate=None):
        """Keep the estimator, the config the node asked for, the delay and the gate."""
        self.inner = inner
        self.config = config
        self.delay = delay
        self.gate = gate
        self.inference = config.inference
        self.calls = []
        self.device = inner.device
        self.dtype = inner.dtype

    def set_inference(self, inference):
        """Remember the per-call settings (applied to the shared model at each call)."""
        self.inference = inference

    def resolved_settings(self, inference=None):
        """Delegate to the wrapped estimator."""
        return self.inner.resolved_settings(inference or self.inference)

    def estimate(self, frames, keys=None):
        """Record the call, wait, then estimate with this node's settings."""
        self.calls.append({'frames': len(frames), 'keys': list(keys or []),
                           'inference': self.inference,
                           'thread': threading.current_thread().name})
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT), 'the test never released the model call'
        if self.delay:
            time.sleep(self.delay)
        self.inner.set_inference(self.inference)
        return self.inner.estimate(frames, keys=keys)


class Graph:
    """A depth node plus a test node with publishers and subscribers, on one executor."""

    def __init__(self, context, estimator, parameters=(), delay=0.0, node_class=DepthNode,
                 factory=None, gate=None):
        """Create the nodes; ``parameters`` are (name, value) overrides."""
        self.context = context
        self.namespace = f'/t{next(_names)}_{os.getpid()}'
        self.spies = []
        overrides = [Parameter('model', value='injected'), Parameter('device', value='cpu'),
                     Parameter('processing_resolution', value=32),
                     Parameter('denoising_steps', value=1),
                     Parameter('warmup', value=False),
                     Parameter('diagnostics_period', value=0.2)]
        overrides += [Parameter(name, value=value) for name, value in parameters]

        def make_spy(config):
            spy = Spy(estimator, config, delay, gate)
            self.spies.append(spy)
            return spy

        self.node = node_class(context=context, namespace=self.namespace,
                               parameter_overrides=overrides,
                               estimator_factory=factory or make_spy)
        self.io = Node(f'test_io_{next(_names)}', context=context, namespace=self.namespace)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.io)
        self.received = defaultdict(list)
        self.publishers = {}
        self.clock = self.io.get_clock()

    def subscribe(self, msg_type, topic):
        """Collect messages of a topic in ``received[topic]``."""
        self.io.create_subscription(msg_type, topic, self.received[topic].append,
                                    QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))

    def subscribe_outputs(self, camera=''):
        """Subscribe to every output of one camera and to /diagnostics."""
        prefix = f'{camera}/' if camera else ''
        for name, msg_type in (('depth/relative', Image), ('depth/image', Image),
                               ('depth/uncertainty', Image), ('depth/camera_info', CameraInfo),
                               ('depth/points', PointCloud2)):
            self.subscribe(msg_type, prefix + name)
        self.subscribe(DiagnosticArray, '/diagnostics')

    def publisher(self, topic, msg_type):
        """Return the publisher of a topic (created on first use)."""
        if topic not in self.publishers:
            self.publishers[topic] = self.io.create_publisher(msg_type, topic, 10)
        return self.publishers[topic]

    def publish(self, topic, msg):
        """Publish on a topic."""
        self.publisher(topic, type(msg)).publish(msg)

    def header(self, frame_id=FRAME):
        """Return a header stamped now."""
        return Header(stamp=self.clock.now().to_msg(), frame_id=frame_id)

    def send(self, camera='', rgb=None, info=True, header=None, compressed=False):
        """Publish camera_info then an image of one camera; return the header used."""
        prefix = f'{camera}/' if camera else ''
        header = header or self.header()
        if info:
            self.publish(prefix + 'camera_info', camera_info(header))
        rgb = image(0) if rgb is None else rgb
        if compressed:
            self.publish(prefix + 'image/compressed', rgb_to_compressed(rgb, header, 'png'))
        else:
            self.publish(prefix + 'image', rgb_to_image(rgb, header))
        return header

    def spin_until(self, predicate, timeout=TIMEOUT):
        """Spin until ``predicate()`` is true; return its last value."""
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.02)
        return predicate()

    def wait_matched(self, topic, subscriptions=1, msg_type=Image):
        """
        Spin until a topic this graph publishes on has that many subscriptions.

        A message published before discovery matched the subscription is lost.
        """
        publisher = self.publisher(topic, msg_type)
        return self.spin_until(lambda: publisher.get_subscription_count() == subscriptions)

    def count(self, topic):
        """Return the number of messages received on a topic."""
        return len(self.received[topic])

    def stamps(self, topic):
        """Return the header stamps of the messages received on a topic, in order."""
        return [msg.header.stamp for msg in self.received[topic]]

    def has(self, topic, header):
        """Whether a message stamped like ``header`` arrived on a topic."""
        return header.stamp in self.stamps(topic)

    def status(self, part='camera'):
        """Return the newest diagnostics status of this node whose name contains ``part``."""
        for array in reversed(self.received['/diagnostics']):
            for status in array.status:
                if status.name.startswith(self.node.get_fully_qualified_name() + ':') and \
                        part in status.name:
                    return status
        return None

    def snapshot(self, camera=''):
        """Return the node's counters of one camera."""
        return self.node.diagnostics.snapshot(camera)

    def close(self):
        """Destroy both nodes (the depth node stops and joins its worker first)."""
        self.executor.remove_node(self.node)
        self.executor.remove_node(self.io)
        self.node.destroy_node()
        self.io.destroy_node()
        self.executor.shutdown(timeout_sec=1.0)


def image(seed, height=H, width=W):
    """Return a random RGB test image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def camera_info(header, width=W, height=H):
    """Return the CameraInfo of the test camera."""
    return CameraModel(width, height, K, frame_id=FRAME).to_msg(header)


def values(status):
    """Return the key/values of a DiagnosticStatus as a dict."""
    return {kv.key: kv.value for kv in status.values}


@pytest.fixture
def graph_factory(context, estimator):
    """Build graphs and close them after the test."""
    graphs = []

    def make(**kwargs):
        graph = Graph(context, estimator, **kwargs)
        graphs.append(graph)
        return graph

    yield make
    for graph in graphs:
        graph.close()


# ---------------------------------------------------------------- outputs


def test_every_output_with_a_fixed_scale(graph_factory):
    """Relative, metric, uncertainty, camera info, cloud and diagnostics; same header."""
    graph = graph_factory(parameters=[('fixed_scale', 2.0), ('fixed_shift', 0.5),
                                      ('ensemble_size', 2), ('warmup', True)])
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    header = graph.send()
    outputs = ('depth/relative', 'depth/image', 'depth/uncertainty', 'depth/camera_info',
               'depth/points')
    assert graph.spin_until(lambda: all(graph.count(t) for t in outputs))
    relative = graph.received['depth/relative'][0]
    metric = graph.received['depth/image'][0]
    for topic in outputs:
        msg = graph.received[topic][0]
        assert msg.header.stamp == header.stamp and msg.header.frame_id == FRAME, topic
    rel = image_to_depth(relative)
    assert relative.encoding == '32FC1' and rel.shape == (H, W)
    assert 0.0 <= rel.min() <= rel.max() <= 1.0
    np.testing.assert_allclose(image_to_depth(metric), 2.0 * rel + 0.5, rtol=1e-5)
    assert image_to_depth(graph.received['depth/uncertainty'][0]).shape == (H, W)
    info = graph.received['depth/camera_info'][0]
    assert (info.width, info.height) == (W, H)
    np.testing.assert_allclose(np.reshape(info.k, (3, 3)), K)
    cloud = graph.received['depth/points'][0]
    assert (cloud.height, cloud.width, cloud.point_step, cloud.is_dense) == (H, W, 16, False)
    xyz = pointcloud2_to_xyz(cloud).reshape(H, W, 3)
    np.testing.assert_allclose(xyz[..., 2], image_to_depth(metric), rtol=1e-6)
    warmup, first = graph.spies[0].calls[:2]
    assert warmup['thread'] == 'marigold_load'  # one blank frame before 'ready'
    assert first['thread'] == 'marigold_worker' and first['inference'].ensemble_size == 2
    assert graph.spin_until(lambda: graph.status() is not None and
                            values(graph.status())['frames published'] == '1')
    camera = values(graph.status())
    assert camera['metric scale'].startswith('fixed: 2')
    assert float(camera['latency p50 (ms)']) > 0 and camera['bad messages'] == '0'
    # Where the latency goes, stage by stage.
    stages = [float(camera[f'{name} p50 (ms)'])
              for name in ('transport', 'queue', 'decode', 'outputs', 'publish')]
    assert all(ms >= 0 for ms in stages) and stages[-1] > 0
    model = graph.status('model')
    assert model.level == DiagnosticStatus.OK and values(model)['state'] == 'ready'
    assert values(model)['device'] == 'cpu' and values(model)['dtype'] == 'float32'


@pytest.mark.parametrize('lazy', [True, False])
def test_outputs_nobody_subscribes_to_are_not_built(graph_factory, lazy):
    """With lazy_outputs the pipeline is asked only for the subscribed outputs."""
    graph = graph_factory(parameters=[('fixed_scale', 2.0), ('lazy_outputs', lazy)])
    graph.subscribe(Image, 'depth/relative')
    assert graph.node.wait_until_ready(TIMEOUT)
    pipeline = graph.node._pipeline
    # The outputs are built by the finish stage (on the finisher thread).
    asked, finish = [], pipeline.finish
    pipeline.finish = lambda frames: asked.append([f.outputs for f in frames]) or \
        finish(frames)
    graph.send()
    assert graph.spin_until(lambda: graph.count('depth/relative') == 1)
    assert asked == [[frozenset({'relative'}) if lazy else frozenset(OUTPUT_NAMES)]]


def test_metric_depth_from_sparse_depth_through_the_graph(graph_factory):
    """
    Sparse depth on its topic gives meters: depth/image, cloud and uncertainty, diagnostics.

    The sparse readings are 3 * relative + 0.7 m (the relative depth the node published for
    the same image), 16UC1 millimeters at 3 % of the pixels.
    """
    graph = graph_factory(parameters=[('scale_recovery.source', 'sparse_depth'),
                                      ('ensemble_size', 2)])
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    rgb = image(5)
    first = graph.send(rgb=rgb)
    assert graph.spin_until(lambda: graph.count('depth/relative') == 1 and
                            graph.count('depth/uncertainty') == 1)
    relative = image_to_depth(graph.received['depth/relative'][0])
    spread = image_to_depth(graph.received['depth/uncertainty'][0])
    truth = 3.0 * relative + 0.7
    sparse = np.zeros((H, W), np.uint16)
    picked = np.random.default_rng(0).random((H, W)) < 0.03
    sparse[picked] = np.round(1000 * truth[picked]).astype(np.uint16)
    header = graph.header()
    graph.publish('sparse_depth', Image(header=header, height=H, width=W, encoding='16UC1',
                                        step=2 * W, data=sparse.astype('<u2').tobytes()))
    graph.send(rgb=rgb, header=header)
    # Messages of one topic arrive in order: once the second frame's metric depth is here,
    # one from the first frame (no scale yet: relative only) would have come before it.
    assert graph.spin_until(lambda: graph.has('depth/image', header))
    assert first.stamp != header.stamp and graph.stamps('depth/image') == [header.stamp]
    metric = graph.received['depth/image'][-1]
    assert metric.encoding == '32FC1'
    np.testing.assert_allclose(image_to_depth(metric), truth, rtol=0.01, atol=0.005)
    assert graph.spin_until(lambda: graph.has('depth/points', header))
    assert graph.stamps('depth/points') == [header.stamp]
    xyz = pointcloud2_to_xyz(graph.received['depth/points'][-1]).reshape(H, W, 3)
    np.testing.assert_allclose(xyz[..., 2], image_to_depth(metric), rtol=1e-6)
    # The spread of the second frame is in meters: about 3 times the relative spread.
    assert graph.spin_until(lambda: graph.count('depth/uncertainty') == 2)
    np.testing.assert_allclose(image_to_depth(graph.received['depth/uncertainty'][-1]),
                               3.0 * spread, rtol=0.02, atol=1e-4)
    assert graph.spin_until(lambda: graph.status() is not None and
                            values(graph.status()).get('scale_status') == 'ok')
    camera = values(graph.status())
    assert abs(float(camera['scale']) - 3.0) < 0.03
    assert abs(float(camera['scale_shift']) - 0.7) < 0.02
    assert int(camera['scale_points']) >= 20 and float(camera['scale_inlier_ratio']) > 0.9


def _sparse_msg(header, truth, fraction, seed=0):
    """Return a 16UC1 sparse depth Image (mm) with readings of ``truth`` at some pixels."""
    sparse = np.zeros((H, W), np.uint16)
    picked = np.random.default_rng(seed).random((H, W)) < fraction
    sparse[picked] = np.round(1000 * truth[picked]).astype(np.uint16)
    return Image(header=header, height=H, width=W, encoding='16UC1', step=2 * W,
                 data=sparse.astype('<u2').tobytes()), picked


def test_sparse_guidance_through_the_graph(graph_factory, estimator):
    """
    scale_recovery.guidance: the metric depth of a frame with sparse points is the guided one.

    The published meters are the guided result (scale and shift in diagnostics, reason
    'guided'), not the global fit of the plain estimate of the same frame; a frame with too
    few points falls back and says why.
    """
    def factory(config):
        estimator.set_inference(config.inference)
        return estimator  # guidance drives the real estimator (no wrapper)

    graph = graph_factory(factory=factory, parameters=[
        ('scale_recovery.source', 'sparse_depth'), ('scale_recovery.guidance', True),
        ('guidance.denoising_steps', 2), ('guidance.iterations_per_step', 1)])
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    rgb = image(9)
    # The plain path on this frame: the estimator's relative depth (the node's settings).
    plain = estimator.estimate([rgb])[0].depth
    # Meters the plain prediction gets roughly right, bent where an affine fit cannot follow.
    cols = np.mgrid[0:H, 0:W][1]
    truth = 3.0 * plain + 0.7 + 0.4 * (cols / W) ** 2
    header = graph.header()
    sparse, picked = _sparse_msg(header, truth, 0.08)
    graph.wait_matched('sparse_depth')
    graph.publish('sparse_depth', sparse)
    graph.send(rgb=rgb, header=header)
    assert graph.spin_until(lambda: graph.has('depth/image', header) and
                            graph.has('depth/relative', header))
    metric = image_to_depth(graph.received['depth/image'][-1])
    relative = image_to_depth(graph.received['depth/relative'][-1])
    assert graph.spin_until(lambda: graph.status() is not None and
                            values(graph.status()).get('scale_guidance') == 'guided')
    status = values(graph.status())
    assert status['scale_reason'] == 'guided' and status['scale_status'] == 'ok'
    assert status['scale_global_fit'].startswith('scale ')
    assert int(status['scale_points']) == int(picked.sum())
    # Meters are the guided scale and shift applied to the published relative depth.
    scale, shift = float(status['scale']), float(status['scale_shift'])
    valid = np.isfinite(metric)
    assert valid.mean() > 0.9
    np.testing.assert_allclose(metric[valid], scale * relative[valid] + shift, rtol=1e-3)
    # The plain path's global fit on the same frame and points.
    from marigold_ros.scale_recovery import ScaleRecovery, ScaleRecoveryConfig
    fitting = ScaleRecovery(ScaleRecoveryConfig(source='sparse_depth', min_inlier_ratio=0.0,
                                                inlier_threshold_rel=1.0))
    fitting.add_sparse_depth('', sparse)
    fit = fitting.estimate('', header, plain)
    plain_metric = fit.scale * plain + fit.shift
    # Guidance made a prediction of its own (its steps, bent towards the points), not the
    # plain one rescaled; with two steps of one update on the tiny model it is not closer
    # to these points than the plain fit (truth is built from the plain prediction), but it
    # fits them within its inlier threshold.
    differs = np.abs(metric - plain_metric) / plain_metric
    assert np.nanmedian(differs) > 1e-3
    guided_error = np.abs(metric[picked] - truth[picked]) / truth[picked]
    assert np.nanmedian(guided_error) < 0.2

    # Too few points: the plain path (here no scale: 5 points fit nothing), reason counted.
    second = graph.header()
    few, _ = _sparse_msg(second, truth, 5 / (H * W), seed=3)
    graph.publish('sparse_depth', few)
    graph.send(rgb=rgb, header=second)
    assert graph.spin_until(lambda: graph.has('depth/relative', second))
    assert graph.spin_until(lambda: 'guidance_too_few_points=1' in values(
        graph.status()).get('scale_input_errors', ''))
    assert values(graph.status())['scale_guidance'] == 'global_fit'
    assert not graph.has('depth/image', second)


def test_compressed_input_without_camera_info(graph_factory):
    """
    Compressed input without camera info: relative depth only, diagnostics say why.

    Corrupt compressed data is counted and skipped.
    """
    graph = graph_factory(parameters=[('image_transport', 'compressed')])
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    corrupt = rgb_to_compressed(image(1), graph.header(), 'jpeg')
    corrupt.data = bytes(corrupt.data)[:30] + b'not a jpeg'
    graph.publish('image/compressed', corrupt)
    assert graph.spin_until(lambda: graph.snapshot()['bad'].get('corrupt_compressed'))
    first = graph.send(info=False, compressed=True)
    assert graph.spin_until(lambda: graph.count('depth/relative') == 1)
    assert graph.spin_until(lambda: graph.status() is not None and
                            'no camera_info' in graph.status().message)
    status = graph.status()
    assert status.level == DiagnosticStatus.WARN
    assert 'no_camera_info' in values(status)['missing outputs']
    # A later frame with camera info and a scale gives every output.  Messages of one topic
    # arrive in order, so anything the first frame had given would have come before them.
    assert graph.node.set_parameters([Parameter('fixed_scale', value=1.0)])[0].successful
    second = graph.send(info=True, compressed=True)
    later = ('depth/relative', 'depth/points', 'depth/camera_info', 'depth/image')
    assert graph.spin_until(lambda: all(graph.has(topic, second) for topic in later))
    assert graph.stamps('depth/relative') == [first.stamp, second.stamp]
    assert graph.stamps('depth/points') == [second.stamp]
    assert graph.stamps('depth/camera_info') == [second.stamp]
    # Relative depth is never published as meters.
    assert graph.stamps('depth/image') == [second.stamp]


# ---------------------------------------------------------------- bad input


def _raw(header, **changes):
    msg = rgb_to_image(image(2), header)
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg


def test_bad_input_counted_logged_and_the_node_keeps_serving(graph_factory):
    """Each bad message gives its diagnostics counter; a good frame still comes through."""
    graph = graph_factory(parameters=[('fixed_scale', 1.0), ('max_input_pixels', 5000)])
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    zero = Header(stamp=Time(), frame_id=FRAME)
    cases = [
        ('empty', lambda h: _raw(h, width=0, height=0, data=b'')),
        ('truncated', lambda h: _raw(h, data=bytes(100))),
        ('bad_step', lambda h: _raw(h, step=W * 3 - 2)),
        ('unknown_encoding', lambda h: _raw(h, encoding='hsv8')),
        ('too_large', lambda h: rgb_to_image(image(3, 100, 100), h)),
        ('empty_frame_id', lambda h: _raw(graph.header(frame_id=''))),
        ('zero_stamp', lambda h: _raw(zero)),
    ]
    for reason, make in cases:
        graph.publish('image', make(graph.header()))
        assert graph.spin_until(lambda: graph.snapshot()['bad'].get(reason)), reason
    depth16 = _raw(graph.header(), encoding='16UC1')
    graph.publish('image', depth16)
    assert graph.spin_until(lambda: graph.snapshot()['bad'].get('unknown_encoding') == 2)
    bad_infos = [('camera_info_uncalibrated', [0.0] * 9),
                 ('camera_info_bad_focal_length', [math.nan, 0, 31.5, 0, 60, 23.5, 0, 0, 1]),
                 ('camera_info_size_mismatch', None)]
    for reason, k in bad_infos:
        header = graph.header()
        info = camera_info(header, width=W * 2) if k is None else camera_info(header)
        if k is not None:
            info.k = [float(v) for v in k]
        graph.publish('camera_info', info)
        graph.publish('image', rgb_to_image(image(4), header))
        assert graph.spin_until(lambda: graph.snapshot()['bad'].get(reason)), reason
    # Every bad camera_info still gave relative (and metric) depth, but never a cloud: the
    # first cloud is the good frame's (the messages of one topic arrive in order).
    assert graph.spin_until(lambda: graph.count('depth/relative') == 3)
    good = graph.send()
    assert graph.spin_until(lambda: graph.has('depth/points', good))
    assert graph.stamps('depth/points') == [good.stamp]
    snapshot = graph.snapshot()
    assert sum(snapshot['bad'].values()) == len(cases) + 1 + len(bad_infos)
    assert graph.spin_until(lambda: graph.status() is not None and
                            'bad: too_large' in values(graph.status()))


def test_implausible_calibration_is_a_warning_and_still_gives_the_cloud(graph_factory,
                                                                        monkeypatch):
    """fx/fy = 3: the cloud comes, the problem is counted and logged as a warning only."""
    graph = graph_factory(parameters=[('fixed_scale', 1.0)])
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    logged = []

    class Logger:
        def __getattr__(self, level):
            return lambda line, **_: logged.append((level, line))

    monkeypatch.setattr(graph.node, 'get_logger', Logger)
    header = graph.header()
    info = camera_info(header)
    info.k[4] = info.k[0] / 3.0
    graph.publish('camera_info', info)
    graph.publish('image', rgb_to_image(image(4), header))
    assert graph.spin_until(lambda: graph.has('depth/points', header))
    assert graph.snapshot()['bad'] == {'camera_info_implausible': 1}
    assert [level for level, line in logged if 'camera_info_implausible' in line] == [
        'warning']


# ---------------------------------------------------------------- threading


def test_several_cameras_share_one_model_call(graph_factory):
    """Two camera namespaces: both frames in one estimator call, outputs per camera."""
    gate = threading.Event()
    graph = graph_factory(parameters=[('cameras', ['left', 'right']), ('fixed_scale', 1.0)],
                          gate=gate)
    graph.subscribe_outputs('left')
    graph.subscribe_outputs('right')
    assert graph.node.wait_until_ready(TIMEOUT)
    # Hold the first model call so that both cameras' frames wait in their slots together.
    graph.send('left', rgb=image(5))
    assert graph.spin_until(lambda: graph.spies[0].calls)
    graph.send('left', rgb=image(6))
    right = graph.send('right', rgb=image(7, 40, 56), info=False)
    assert graph.spin_until(lambda: graph.snapshot('left')['received'] == 2 and
                            graph.snapshot('right')['received'] == 1)
    gate.set()
    assert graph.spin_until(lambda: graph.count('right/depth/relative') == 1)
    assert graph.spin_until(lambda: graph.count('left/depth/relative') == 2)
    assert [(c['frames'], sorted(c['keys'])) for c in graph.spies[0].calls] == \
        [(1, ['left']), (2, ['left', 'right'])]
    assert graph.received['right/depth/relative'][0].width == 56
    assert graph.spin_until(lambda: graph.count('left/depth/points') == 2)
    # The right camera had no camera_info: no cloud.  A later right frame with one gives
    # the first right cloud (the messages of one topic arrive in order).
    later = graph.send('right', rgb=image(8))
    assert graph.spin_until(lambda: graph.has('right/depth/points', later))
    assert later.stamp != right.stamp
    assert graph.stamps('right/depth/points') == [later.stamp]


def test_frames_arriving_while_busy_are_dropped_not_queued(graph_factory):
    """A busy model: callbacks keep only the newest frame and count the others."""
    gate = threading.Event()
    graph = graph_factory(gate=gate)
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    sent = 5
    first = graph.send(rgb=image(0), info=False)
    assert graph.spin_until(lambda: graph.spies[0].calls)  # the model holds frame 0
    for index in range(1, sent):  # each taken by the node before the next (input depth 1)
        last = graph.send(rgb=image(index), info=False)
        assert graph.spin_until(lambda: graph.snapshot()['received'] == index + 1)
    gate.set()
    assert graph.spin_until(lambda: graph.snapshot()['published'] +
                            graph.snapshot()['dropped'] == sent)
    snapshot = graph.snapshot()
    # Frames 1 to 3 were replaced in the slot by the next; frame 4 was processed next.
    assert (snapshot['dropped'], snapshot['published']) == (sent - 2, 2)
    assert len(graph.spies[0].calls) == 2
    # Published is counted before the message reaches this test's subscriber.
    assert graph.spin_until(lambda: graph.count('depth/relative') == snapshot['published'])
    # The last frame sent is never the one dropped: the newest always wins.
    assert graph.stamps('depth/relative') == [first.stamp, last.stamp]


def test_model_loading_does_not_block_and_failure_is_reported(context, estimator):
    """Diagnostics say 'loading' while the model loads; a missing model is an ERROR."""
    release = threading.Event()

    def slow_factory(config):
        release.wait(TIMEOUT)
        return Spy(estimator, config)

    graph = Graph(context, estimator, factory=slow_factory)
    failing = Graph(context, estimator, parameters=[('model', '/nonexistent/marigold')],
                    factory=_default_factory)
    try:
        graph.subscribe(DiagnosticArray, '/diagnostics')
        failing.subscribe(DiagnosticArray, '/diagnostics')
        assert graph.spin_until(lambda: graph.status('model') is not None)
        assert values(graph.status('model'))['state'] == 'loading'
        graph.send(info=False)
        graph.send(info=False)
        assert graph.spin_until(lambda: graph.snapshot()['received'] == 2)
        release.set()
        assert graph.node.wait_until_ready(TIMEOUT)
        assert failing.spin_until(lambda: failing.status('model') is not None and
                                  failing.status('model').level == DiagnosticStatus.ERROR)
        message = failing.status('model').message
        assert 'nonexistent' in message and 'not found' in message
        failing.send(info=False)
        assert failing.spin_until(lambda: failing.snapshot()['received'] == 1)
    finally:
        release.set()
        graph.close()
        failing.close()


def _default_factory(config):
    from marigold_ros.depth_node import default_estimator_factory
    return default_estimator_factory(config)


def test_shutdown_under_load_joins_the_worker(graph_factory):
    """Destroying the node while frames pour in and the model runs ends cleanly."""
    gate = threading.Event()
    graph = graph_factory(gate=gate)
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    for index in range(4):
        graph.send(rgb=image(index), info=False)
        assert graph.spin_until(lambda: graph.snapshot()['received'] == index + 1)
    assert graph.spin_until(lambda: graph.spies[0].calls)
    worker, finisher = graph.node._worker, graph.node._finisher
    assert worker is not None and worker.is_alive() and finisher.is_alive()
    # The model call ends only once the node has been told to stop: the destroy below
    # happens while the call is in progress, on any machine.
    stopping = graph.node._stop
    releaser = threading.Thread(target=lambda: stopping.wait(TIMEOUT) and gate.set())
    releaser.start()
    graph.node.destroy_node()
    releaser.join(TIMEOUT)
    assert gate.is_set()
    assert not worker.is_alive() and not finisher.is_alive()
    graph.io.destroy_node()
    graph.close = lambda: None


# ---------------------------------------------------------------- parameters


def test_runtime_parameter_changes(graph_factory):
    """Steps, ensemble and resolution apply to the next call; bad and read-only refused."""
    graph = graph_factory()
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    node = graph.node
    results = node.set_parameters([Parameter('ensemble_size', value=2),
                                   Parameter('denoising_steps', value=1),
                                   Parameter('processing_resolution', value=48),
                                   Parameter('fixed_scale', value=3)])
    assert all(r.successful for r in results)
    assert not node.set_parameters([Parameter('ensemble_size', value=0)])[0].successful
    assert not node.set_parameters([Parameter('model', value='other')])[0].successful
    assert not node.set_parameters([Parameter('cameras', value=['x'])])[0].successful
    assert not node.set_parameters([Parameter('fixed_scale', value='big')])[0].successful
    graph.send()
    assert graph.spin_until(lambda: graph.count('depth/points') == 1)
    used = graph.spies[0].calls[-1]['inference']
    assert (used.ensemble_size, used.denoising_steps, used.processing_resolution) == (2, 1, 48)
    assert graph.count('depth/uncertainty') == 1
    rel = image_to_depth(graph.received['depth/relative'][0])
    np.testing.assert_allclose(image_to_depth(graph.received['depth/image'][0]), 3.0 * rel,
                               rtol=1e-5)
    assert node.get_parameter('fixed_scale').value == 3


def test_camera_info_matched_by_stamp(graph_factory):
    """A camera_info within the tolerance (even arriving late) matches; others do not."""
    graph = graph_factory(parameters=[('fixed_scale', 1.0), ('camera_info_tolerance', 0.005),
                                      ('camera_info_wait', 0.5)])
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    header = graph.send()
    assert graph.spin_until(lambda: graph.count('depth/points') == 1)
    # The camera_info follows its image: the worker waits for it (camera_info_wait).
    header = graph.header()
    graph.publish('image', rgb_to_image(image(8), header))
    assert graph.spin_until(lambda: graph.snapshot()['received'] == 2)  # the image is in
    graph.publish('camera_info', camera_info(header))
    assert graph.spin_until(lambda: graph.count('depth/points') == 2)
    # Off by 20 ms > tolerance: relative depth only.
    header = graph.header()
    off = Header(frame_id=FRAME, stamp=Time(sec=header.stamp.sec,
                                            nanosec=header.stamp.nanosec))
    off_ns = header.stamp.sec * 10 ** 9 + header.stamp.nanosec + 20_000_000
    off.stamp = Time(sec=off_ns // 10 ** 9, nanosec=off_ns % 10 ** 9)
    graph.publish('camera_info', camera_info(off))
    graph.publish('image', rgb_to_image(image(9), header))
    assert graph.spin_until(lambda: graph.count('depth/relative') == 3)
    # The worker records a frame's notes just after publishing it.
    assert graph.spin_until(lambda: graph.snapshot()['published'] == 3)
    assert 'no_camera_info' in graph.snapshot()['notes']
    # A later matching frame gives the next cloud; the messages of one topic arrive in order,
    # so a cloud of the mismatched frame would have come before it.
    later = graph.send()
    assert graph.spin_until(lambda: graph.has('depth/points', later))
    assert header.stamp not in graph.stamps('depth/points')
    assert graph.count('depth/points') == 3


def test_static_camera_info_with_use_latest_is_not_waited_for(graph_factory):
    """use_latest takes the newest camera_info at once instead of waiting for a match."""
    graph = graph_factory(parameters=[('fixed_scale', 1.0), ('camera_info_use_latest', True),
                                      ('camera_info_wait', 5.0)])
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    matcher = graph.node._matchers['']
    # Once, like a static driver, stamped well before the images.
    static = graph.clock.now() - Duration(seconds=1)
    graph.publish('camera_info', camera_info(Header(stamp=static.to_msg(), frame_id=FRAME)))
    assert graph.spin_until(lambda: matcher.fallback() is not None)
    # Waiting for a match polls the matcher until one comes or camera_info_wait (5 s) ends;
    # taking the newest at once asks it once per frame.  Counted, not timed.
    asked, match = [], matcher.match
    matcher.match = lambda stamp, *rest: asked.append(stamp) or match(stamp, *rest)
    for count in (1, 2):
        header = graph.header()
        graph.publish('image', rgb_to_image(image(count), header))
        assert graph.spin_until(lambda: graph.has('depth/points', header))
        assert asked.count(stamp_to_ns(header.stamp)) == 1
    assert graph.count('depth/points') == 2


def test_warmup_frame_fits_the_pixel_limit():
    """The warm-up frame is 640x480 unless max_input_pixels is smaller."""
    assert warmup_frame(0).shape == (480, 640, 3)
    assert warmup_frame(10 ** 7).shape == (480, 640, 3)
    for limit in (76800, 1000, 1):
        height, width, _ = warmup_frame(limit).shape
        assert 0 < height * width <= limit


# ---------------------------------------------------------------- lifecycle


def test_lifecycle_node(context, estimator):
    """Lifecycle: configure loads, activate publishes, deactivate stops, bad model fails."""
    graph = Graph(context, estimator, node_class=DepthLifecycleNode,
                  parameters=[('fixed_scale', 1.0)])
    failing = Graph(context, estimator, node_class=DepthLifecycleNode,
                    parameters=[('model', '/nonexistent/marigold')], factory=_default_factory)
    try:
        graph.subscribe_outputs()
        node = graph.node
        early = graph.send()  # unconfigured: nobody listens, nothing is loaded
        assert not graph.spies
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert graph.wait_matched('image') and graph.wait_matched('camera_info', 1, CameraInfo)
        active = graph.send()
        assert graph.spin_until(lambda: graph.has('depth/relative', active) and
                                graph.has('depth/points', active))
        # The messages of one topic arrive in order: the early frame gave nothing.
        assert early.stamp != active.stamp
        assert graph.stamps('depth/relative') == [active.stamp]
        assert len(graph.spies) == 1 and len(graph.spies[0].calls) == 1
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert graph.wait_matched('image', 0)
        inactive = graph.send()
        # Active again, a later frame comes through; the one sent while inactive did not.
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert graph.wait_matched('image') and graph.wait_matched('camera_info', 1, CameraInfo)
        again = graph.send()
        assert graph.spin_until(lambda: graph.has('depth/relative', again))
        assert inactive.stamp not in graph.stamps('depth/relative')
        assert graph.stamps('depth/relative') == [active.stamp, again.stamp]
        assert len(graph.spies[0].calls) == 2
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert failing.node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert failing.node.diagnostics.model_state == 'error'
    finally:
        graph.close()
        failing.close()


def test_reactivation_never_runs_two_workers(context, estimator):
    """A worker left behind by a deactivate (call longer than shutdown_timeout) stops."""
    gate = threading.Event()
    graph = Graph(context, estimator, node_class=DepthLifecycleNode, gate=gate,
                  parameters=[('fixed_scale', 1.0), ('shutdown_timeout', 0.0)])
    try:
        graph.subscribe_outputs()
        node = graph.node
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert graph.wait_matched('image')
        graph.send()
        assert graph.spin_until(lambda: graph.spies[0].calls)  # a held call is running
        old, old_finisher = node._worker, node._finisher
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS  # does not wait
        assert old.is_alive()  # left behind in its call
        assert graph.wait_matched('image', 0)
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert graph.wait_matched('image')
        gate.set()  # the old call ends
        old.join(TIMEOUT)
        old_finisher.join(TIMEOUT)
        assert not old.is_alive() and not old_finisher.is_alive()
        workers = [t for t in threading.enumerate() if t.name == 'marigold_worker']
        assert workers == [node._worker]
        finishers = [t for t in threading.enumerate() if t.name == 'marigold_finisher']
        assert finishers == [node._finisher]
        calls = len(graph.spies[0].calls)
        graph.send()
        assert graph.spin_until(lambda: len(graph.spies[0].calls) == calls + 1)
    finally:
        graph.close()


# ---------------------------------------------------------------- diagnostics pieces


def test_diagnostics_building_blocks():
    """Rates over a window, percentiles, the per-key throttle and the array layout."""
    meter = RateMeter(window_s=2.0)
    for step in range(11):
        meter.add(100.0 + 0.1 * step)
    assert meter.rate(now=101.0) == pytest.approx(10.0)
    assert meter.rate(now=110.0) == 0.0
    window = Percentiles(size=100)
    for value in range(1, 201):
        window.add(value)
    window.add(math.nan)
    assert len(window) == 100 and window.percentile(50) == pytest.approx(150.5)
    throttle = KeyedThrottle(period_s=5.0)
    assert throttle.allow('a', now=0.0) == (True, 0)
    assert throttle.allow('a', now=1.0) == (False, 0)
    assert throttle.allow('b', now=1.0) == (True, 0)  # other problems are not hidden
    assert throttle.allow('a', now=6.0) == (True, 1)
    collector = DiagnosticsCollector('n')
    collector.set_model_state('error', 'boom', device='cpu')
    collector.bad_message('cam', 'truncated')
    array = collector.to_msg()
    assert [s.name for s in array.status] == ['n: model', 'n: camera cam']
    assert array.status[0].level == DiagnosticStatus.ERROR and 'boom' in array.status[0].message
    assert array.status[1].level == DiagnosticStatus.WARN
    assert values(array.status[1])['bad: truncated'] == '1'
    assert collector.to_msg().status[1].level == DiagnosticStatus.OK  # no new bad message
    # A camera that stopped, or never started once the model is ready, is a WARN.
    quiet = DiagnosticsCollector('n', silence_s=5.0)
    quiet.add_stream('cam')
    start = time.monotonic()
    assert quiet.to_msg(now=start + 60).status[1].message == 'waiting for images'  # loading
    quiet.set_model_state('ready')
    status = quiet.to_msg(now=start + 60).status[1]
    assert status.level == DiagnosticStatus.WARN and 'no images for 60 s' in status.message
    quiet.image_received('cam', now=start + 61)
    assert quiet.to_msg(now=start + 62).status[1].level == DiagnosticStatus.OK
    assert 'no images for 9 s' in quiet.to_msg(now=start + 70).status[1].message
    # Not listening (an inactive lifecycle node): no silence; listening again counts anew.
    quiet.set_listening(False)
    assert quiet.to_msg(now=start + 70).status[1].level == DiagnosticStatus.OK
    quiet.set_listening(True, now=start + 80)
    assert quiet.to_msg(now=start + 82).status[1].level == DiagnosticStatus.OK
    assert 'no images for 6 s' in quiet.to_msg(now=start + 86).status[1].message
    # No metric scale is a WARN only where one was asked for (scale recovery configured).
    quiet.frame_published('cam', 0.1, 0.05, notes=('no_metric_scale',), now=start + 61)
    assert quiet.to_msg(now=start + 62).status[1].level == DiagnosticStatus.OK
    quiet.metric_expected = True
    assert quiet.to_msg(now=start + 62).status[1].level == DiagnosticStatus.WARN
    collector.set_model_state('ready', '', device='cpu')
    collector.update_model_info(denoising_steps=2)  # settings only: the state stays
    assert collector.model_state == 'ready' and collector.model_info['denoising_steps'] == '2'


# ---------------------------------------------------------------- as a user runs it


def test_console_script_in_its_own_process(model_path, context, tmp_path):
    """Run depth_node as a separate process, get depth across processes, stop with SIGINT."""
    script = Path(sys.executable).with_name('depth_node')  # this venv's (kilted or jazzy)
    command = [str(script)] if script.exists() else \
        [sys.executable, '-m', 'marigold_ros.depth_node']
    namespace = f'/xproc_{os.getpid()}'
    domain = 1 + os.getpid() % 100
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               ROS_DOMAIN_ID=str(domain), PYTHONUNBUFFERED='1')
    command += ['--ros-args', '-r', f'__ns:={namespace}', '-p', f'model:={model_path}',
                '-p', 'device:=cpu', '-p', 'processing_resolution:=32',
                '-p', 'denoising_steps:=1',
                '-p', 'fixed_scale:=2', '-p', 'input_reliability:=reliable']
    stderr_path = tmp_path / 'stderr.txt'
    with open(stderr_path, 'w') as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    # This process joins the same domain with localhost discovery in a context of its own.
    saved = os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE')
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    peer = rclpy.Context()
    try:
        rclpy.init(context=peer, domain_id=domain)
    finally:
        if saved is None:
            del os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE']
        else:
            os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = saved
    node = Node('xproc_test', context=peer, namespace=namespace)
    executor = SingleThreadedExecutor(context=peer)
    executor.add_node(node)
    received = []
    node.create_subscription(PointCloud2, 'depth/points', received.append, 10)
    image_pub = node.create_publisher(Image, 'image', 10)
    info_pub = node.create_publisher(CameraInfo, 'camera_info', 10)
    try:
        deadline = time.monotonic() + 120.0
        while not received and time.monotonic() < deadline and process.poll() is None:
            header = Header(stamp=node.get_clock().now().to_msg(), frame_id=FRAME)
            info_pub.publish(camera_info(header))
            image_pub.publish(rgb_to_image(image(10), header))
            end = time.monotonic() + 0.25
            while time.monotonic() < end:
                executor.spin_once(timeout_sec=0.02)
        assert received, 'no point cloud from the node process: ' + stderr_path.read_text()
        assert (received[0].height, received[0].width) == (H, W)
        for _ in range(5):  # keep it busy while it is asked to stop
            image_pub.publish(rgb_to_image(image(11), Header(
                stamp=node.get_clock().now().to_msg(), frame_id=FRAME)))
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.shutdown(context=peer)
    errors = stderr_path.read_text()
    assert code == 0, errors
    assert 'Traceback' not in errors and 'InvalidHandle' not in errors, errors


# ---------------------------------------------------------------- on a real ROS install


def _subscription(node, suffix):
    """Return the node's input subscription whose topic ends with ``suffix``."""
    found = [sub for sub in node._inputs if sub.topic_name.endswith(suffix)]
    assert len(found) == 1, [sub.topic_name for sub in node._inputs]
    return found[0]


def test_messages_the_middleware_lost_are_counted_and_explained(graph_factory):
    """Lost messages (QoS event) of image and camera_info: counted, a WARN saying what to do."""
    from types import SimpleNamespace

    from rclpy.event_handler import QoSSubscriptionEventType
    graph = graph_factory()
    graph.subscribe(DiagnosticArray, '/diagnostics')
    handlers = {}
    for what in ('image', 'camera_info'):
        subscription = _subscription(graph.node, '/' + what)
        events = {h.event_type: h for h in subscription.event_handlers}
        # Fast DDS and Cyclone DDS both report lost messages and incompatible QoS.
        assert QoSSubscriptionEventType.RCL_SUBSCRIPTION_REQUESTED_INCOMPATIBLE_QOS in events
        handlers[what] = events[QoSSubscriptionEventType.RCL_SUBSCRIPTION_MESSAGE_LOST]
    # What the rmw hands the callback (rmw_message_lost_status_t has no setters).
    handlers['image'].callback(SimpleNamespace(total_count=7, total_count_change=7))
    handlers['image'].callback(SimpleNamespace(total_count=7, total_count_change=0))
    handlers['camera_info'].callback(SimpleNamespace(total_count=2, total_count_change=2))
    assert graph.snapshot()['lost'] == {'image': 7, 'camera_info': 2}

    def lost_status():
        status = graph.status()
        return status if status is not None and \
            values(status).get('messages lost (middleware)') == '9' else None

    assert graph.spin_until(lost_status)
    status = lost_status()
    assert values(status)['lost: image'] == '7' and values(status)['lost: camera_info'] == '2'
    # The first report after the loss is a WARN saying what to do; later ones are not.
    first = [s for a in graph.received['/diagnostics'] for s in a.status
             if s.name == status.name and 'lost by the middleware' in s.message]
    assert first and first[0].level == DiagnosticStatus.WARN
    assert '9 messages lost' in first[0].message
    assert 'input_reliability:=reliable' in first[0].message


def test_each_frame_keeps_its_camera_info_while_the_model_is_busy(graph_factory):
    """More camera_infos than the matcher keeps arrive while a frame waits: it keeps its own."""
    first_call, second_call = threading.Event(), threading.Event()
    graph = graph_factory(parameters=[('fixed_scale', 1.0), ('camera_info_wait', 0.0)],
                          gate=first_call)
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    matcher = graph.node._matchers['']

    def stream_infos(after, count=40):
        """Publish camera_infos at 30 Hz stamps after ``after``, each stored before the next."""
        start = stamp_to_ns(after.stamp)
        for tick in range(1, count + 1):
            ns = start + tick * 33_333_333
            header = Header(stamp=Time(sec=ns // 10 ** 9, nanosec=ns % 10 ** 9), frame_id=FRAME)
            graph.publish('camera_info', camera_info(header))
            assert graph.spin_until(
                lambda: matcher._matcher.latest().header.stamp == header.stamp)

    held = graph.send()  # the model holds this frame until first_call is set
    assert graph.spin_until(lambda: graph.spies and graph.spies[0].calls)
    spy = graph.spies[0]
    # 1. camera_info first, then the image (a driver's order), then 40 more infos.
    waiting = graph.header()
    graph.publish('camera_info', camera_info(waiting))
    assert graph.spin_until(lambda: matcher._matcher.latest().header.stamp == waiting.stamp)
    graph.publish('image', rgb_to_image(image(1), waiting))
    assert graph.spin_until(lambda: graph.snapshot()['received'] == 2)
    stream_infos(waiting)
    assert matcher.match(stamp_to_ns(waiting.stamp)) is None  # gone from the matcher
    spy.gate = second_call
    first_call.set()
    assert graph.spin_until(lambda: len(spy.calls) == 2)  # the worker took the frame
    # 2. the image first, its camera_info after it, then 40 more, while the model is busy.
    late = graph.header()
    graph.publish('image', rgb_to_image(image(2), late))
    assert graph.spin_until(lambda: graph.snapshot()['received'] == 3)
    graph.publish('camera_info', camera_info(late))
    stream_infos(late)
    assert matcher.match(stamp_to_ns(late.stamp)) is None
    second_call.set()
    assert graph.spin_until(lambda: graph.count('depth/camera_info') == 3)
    assert graph.stamps('depth/camera_info') == [held.stamp, waiting.stamp, late.stamp]
    assert graph.spin_until(lambda: graph.count('depth/points') == 3)
    assert graph.snapshot()['dropped'] == 0


def test_qos_overrides_and_a_latched_camera_info(context, estimator):
    """qos_overrides.* parameters set inputs and outputs; a latched camera_info arrives."""
    from rclpy.qos import DurabilityPolicy
    namespace = f'/qos{next(_names)}_{os.getpid()}'
    io = Node(f'latch_{next(_names)}', context=context, namespace=namespace)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    publisher = io.create_publisher(CameraInfo, 'camera_info', latched)
    publisher.publish(camera_info(Header(stamp=Time(sec=5), frame_id=FRAME)))
    overrides = [Parameter('model', value='injected'), Parameter('warmup', value=False),
                 Parameter('camera_info_transient_local', value=True),
                 Parameter(f'qos_overrides.{namespace}/camera_info.subscription.reliability',
                           value='reliable'),
                 Parameter(f'qos_overrides.{namespace}/image.subscription.depth', value=7),
                 Parameter(f'qos_overrides.{namespace}/depth/points.publisher.reliability',
                           value='best_effort')]
    node = DepthNode(context=context, namespace=namespace, parameter_overrides=overrides,
                     estimator_factory=lambda config: Spy(estimator, config))
    executor = SingleThreadedExecutor(context=context)
    try:
        executor.add_node(node)
        executor.add_node(io)
        info_qos = _subscription(node, '/camera_info').qos_profile
        assert info_qos.reliability == ReliabilityPolicy.RELIABLE  # overridden
        assert info_qos.durability == DurabilityPolicy.TRANSIENT_LOCAL
        image_qos = _subscription(node, '/image').qos_profile
        assert image_qos.depth == 7 and image_qos.reliability == ReliabilityPolicy.BEST_EFFORT
        points = node._outputs['']['points'].qos_profile
        assert points.reliability == ReliabilityPolicy.BEST_EFFORT
        assert node._outputs['']['relative'].qos_profile.reliability == \
            ReliabilityPolicy.RELIABLE
        # Published before the node existed: only a transient local subscription gets it.
        matcher = node._matchers['']
        deadline = time.monotonic() + TIMEOUT
        while matcher.match(5 * 10 ** 9) is None and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.02)
        assert matcher.match(5 * 10 ** 9).header.stamp == Time(sec=5)
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        io.destroy_node()


def test_stamps_far_from_the_clock_are_warned_and_not_latencies(graph_factory):
    """An image stamped 2 h ago (sim time vs wall time) is served, flagged, not a latency."""
    graph = graph_factory(parameters=[('fixed_scale', 1.0)])
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    old = Header(stamp=(graph.clock.now() - Duration(seconds=7200)).to_msg(), frame_id=FRAME)
    graph.send(header=old)
    assert graph.spin_until(lambda: graph.snapshot()['published'] == 1)
    snapshot = graph.snapshot()
    assert snapshot['off_clock'] == 1 and math.isnan(snapshot['latency_p50_s'])
    assert graph.node.diagnostics.recent('')['transport_s'] == []
    assert ('', 'stamp_off_clock') in graph.node._throttle._last  # the warning was logged

    def flagged():
        status = graph.status()
        return status if status is not None and 'sim time' in status.message else None

    assert graph.spin_until(flagged)
    assert flagged().level == DiagnosticStatus.WARN
    assert values(flagged())['latency p50 (ms)'] == 'n/a'
    # A frame stamped now is a latency again.
    graph.send()
    assert graph.spin_until(lambda: graph.snapshot()['published'] == 2)
    assert graph.snapshot()['latency_p50_s'] >= 0 and graph.snapshot()['off_clock'] == 1


def test_depth_colored_when_subscribed(graph_factory):
    """depth/colored: rgb8 colour map of the metric depth, per-frame or fixed range."""
    from marigold_model.data.synthetic import colorize_depth
    from marigold_ros.conversions import image_to_rgb
    graph = graph_factory(parameters=[('fixed_scale', 2.0)])
    graph.subscribe(Image, 'depth/image')
    graph.subscribe(Image, 'depth/colored')
    assert graph.node.wait_until_ready(TIMEOUT)
    assert graph.spin_until(
        lambda: graph.node._outputs['']['colored'].get_subscription_count() == 1)
    graph.send()
    assert graph.spin_until(lambda: graph.count('depth/colored') == 1)
    colored = graph.received['depth/colored'][0]
    assert colored.encoding == 'rgb8' and (colored.height, colored.width) == (H, W)
    metric = image_to_depth(graph.received['depth/image'][0])
    np.testing.assert_array_equal(image_to_rgb(colored),
                                  colorize_depth(metric, np.isfinite(metric)))
    # A fixed range (runtime parameters): the metric depth from 0 m to 4 m.
    graph.node.set_parameters([Parameter('colored_range_min', value=0.0),
                               Parameter('colored_range_max', value=4.0)])
    graph.send(rgb=image(3))
    assert graph.spin_until(lambda: graph.count('depth/colored') == 2)
    metric = image_to_depth(graph.received['depth/image'][1])
    fixed = image_to_rgb(graph.received['depth/colored'][1])
    np.testing.assert_array_equal(fixed, colorize_depth(metric, np.isfinite(metric),
                                                        (0.0, 4.0)))
    assert not np.array_equal(fixed, colorize_depth(metric, np.isfinite(metric)))


def test_incompatible_publishers_are_reported_with_the_policy_to_change(graph_factory):
    """A best-effort image publisher and a volatile camera_info one: which setting to change."""
    from rclpy.qos import qos_profile_sensor_data
    graph = graph_factory(parameters=[('input_reliability', 'reliable'),
                                      ('camera_info_transient_local', True)])
    reports, report = [], graph.node._throttle.report
    graph.node._throttle.report = lambda key, text, now=None: \
        reports.append(text) or report(key, text, now)
    graph.io.create_publisher(Image, 'image', qos_profile_sensor_data)  # best effort
    graph.io.create_publisher(CameraInfo, 'camera_info', 10)  # volatile
    assert graph.spin_until(lambda: graph.snapshot()['bad'].get('incompatible_qos') == 2)
    image_line = [r for r in reports if '/image offers a QoS reliability' in r]
    info_line = [r for r in reports if '/camera_info offers a QoS durability' in r]
    assert image_line and info_line, reports
    assert "set input_reliability to 'best_effort'" in image_line[0]
    assert 'camera_info_transient_local to false' in info_line[0]


# ---------------------------------------------------------------- model and outputs overlap


class Stepped(Spy):
    """A Spy whose call i waits for ``gates[i]`` (later calls run at once); counts returns."""

    def __init__(self, inner, config, gates):
        """Keep the gates, one per call."""
        super().__init__(inner, config)
        self.gates = gates
        self.returned = 0

    def estimate(self, frames, keys=None):
        """Wait for this call's gate, estimate, count the return."""
        index = len(self.calls)
        self.gate = self.gates[index] if index < len(self.gates) else None
        result = super().estimate(frames, keys)
        self.returned += 1
        return result


def test_model_runs_the_next_frame_while_the_last_one_is_published(graph_factory, estimator):
    """The model thread is inside call N+1 while frame N is finished and published."""
    gates = [threading.Event(), threading.Event()]
    gates[0].set()  # frame A's call runs at once, frame B's is held
    spies = []
    graph = graph_factory(
        parameters=[('fixed_scale', 1.0)],
        factory=lambda config: spies.append(Stepped(estimator, config, gates)) or spies[-1])
    graph.subscribe_outputs()
    assert graph.node.wait_until_ready(TIMEOUT)
    spy = spies[0]
    # Hold the finish stage of frame A: the test decides when its outputs are built.
    pipeline = graph.node._pipeline
    finishing, release, finish = threading.Event(), threading.Event(), pipeline.finish

    def held_finish(frames):
        if not finishing.is_set():
            finishing.set()
            assert release.wait(TIMEOUT), 'the test never released the finish stage'
        return finish(frames)

    pipeline.finish = held_finish
    first = graph.send(rgb=image(1))
    assert graph.spin_until(finishing.is_set)  # A is past the model, in its finish stage
    second = graph.send(rgb=image(2))
    # The model takes B while A's outputs are still being built.
    assert graph.spin_until(lambda: len(spy.calls) == 2)
    assert spy.returned == 1 and graph.count('depth/relative') == 0
    release.set()
    # A is published while the model is still inside B's call (its gate is closed).
    assert graph.spin_until(lambda: graph.count('depth/points') == 1)
    assert graph.stamps('depth/relative') == [first.stamp]
    assert spy.returned == 1 and not gates[1].is_set()
    gates[1].set()
    assert graph.spin_until(lambda: graph.count('depth/points') == 2)
    assert graph.stamps('depth/relative') == [first.stamp, second.stamp]
    assert graph.stamps('depth/points') == [first.stamp, second.stamp]
    assert [call['thread'] for call in spy.calls] == ['marigold_worker'] * 2
    assert graph.snapshot()['dropped'] == 0 and graph.snapshot()['published'] == 2


def test_order_per_camera_holds_with_the_threads_overlapping(graph_factory):
    """Many frames of two cameras: per camera, outputs come in stamp order, newest last."""
    graph = graph_factory(parameters=[('cameras', ['left', 'right']), ('fixed_scale', 1.0)])
    graph.subscribe_outputs('left')
    graph.subscribe_outputs('right')
    assert graph.node.wait_until_ready(TIMEOUT)
    sent = {'left': [], 'right': []}
    for index in range(16):
        camera = ('left', 'right')[index % 2]
        sent[camera].append(graph.send(camera, rgb=image(index)).stamp)
        assert graph.spin_until(
            lambda: graph.snapshot(camera)['received'] == len(sent[camera]))
    for camera, stamps in sent.items():
        # Every frame is published or counted as dropped; the newest one always wins.
        assert graph.spin_until(lambda: graph.snapshot(camera)['published'] +
                                graph.snapshot(camera)['dropped'] == len(stamps))
        published = graph.snapshot(camera)['published']
        assert graph.spin_until(
            lambda: graph.count(f'{camera}/depth/points') == published)
        for topic in ('depth/relative', 'depth/image', 'depth/points'):
            got = graph.stamps(f'{camera}/{topic}')
            assert got[-1] == stamps[-1], topic
            # In the order sent, none twice, and only frames that were sent.
            order = [stamps.index(stamp) for stamp in got]
            assert order == sorted(set(order)), (camera, topic, order)


def test_handoff_keeps_order_and_bounds_the_batches_in_flight():
    """Batches leave in order; the model waits while two are past it and unpublished."""
    handoff, stop = Handoff(), threading.Event()
    assert handoff.wait_room(stop)
    handoff.put('k')
    assert handoff.wait_room(stop)  # the finisher need not have taken batch k yet
    handoff.put('k+1')
    assert not handoff.wait_room(stop)  # k and k+1 both unpublished: no new frames taken
    assert handoff.take(stop) == 'k'
    assert not handoff.wait_room(stop)  # k is being finished, k+1 waits
    handoff.done()
    assert handoff.wait_room(stop)
    assert handoff.take(stop) == 'k+1'
    handoff.put('k+2')
    stop.set()
    assert handoff.take(stop) is None and not handoff.wait_room(stop)
