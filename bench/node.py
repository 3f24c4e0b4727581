"""
Benchmark of the live depth node at 640x480 with the tiny model on CPU, in one run.

1. Node overhead = (image stamp -> publish latency - estimator time) / estimator time, per
   frame, in steady state: a closed loop in one process (publisher -> node -> subscriber),
   all outputs on and subscribed (relative and metric depth from a fixed scale, camera
   info, organized RGB cloud); the next frame is sent when all of them have arrived.
   Target <= 0.05.
2. The node's own work per frame without the model: image conversion plus depth images,
   camera info, metric depth and the organized cloud (DepthPipeline with an instant
   estimator), in ms; and its cloud builder alone against the structured-array reference
   of bench/conversions.py (what sensor_msgs_py.create_cloud does), on the same frame,
   both timed the same way: warm-up, then the median of the repeats.
3. Memory: resident set size over ``--frames`` frames (1000 by default) through the node;
   flat means no growth after the warm-up.
4. The floor: rclpy alone publishing one frame's prebuilt outputs and bringing one image
   in, with no node work (what no change inside the node can remove).

The bundled tiny model is used when it exists; otherwise a randomly initialised model of
the same kind (the timings do not depend on the weights, the run says which it used).
No assertion on time: the machine is shared, the figures are printed as measured.

5. With ``--stand-in-ms T``: the node against bench/stand_in.py (T ms per frame, the GIL
   released, as a GPU model's thread waits), open loop at the model's pace, 640x480 rgb8
   in, depth/image + depth/points + depth/relative subscribed: throughput against 1000 / T
   fps (target >= 0.95) and stamp-to-publish latency minus T (target <= 4 ms p50), with
   the stages; ``--cameras N`` feeds N cameras into the one node.  Runs instead of 1-3.

Run: .venv/bin/python bench/node.py [--frames 1000] [--model MODEL]
     .venv/bin/python bench/node.py --stand-in-ms 5 10 20 40 [--cameras 4] [--seconds 10]
"""

import argparse
import json
import math
import os
from pathlib import Path
import tempfile
import time

from conversions import median_ms, reference_cloud  # bench/conversions.py, next to this file
from marigold_model.estimator import DepthResult
from marigold_ros.conversions import rgb_to_image
from marigold_ros.demo import load_sequence
from marigold_ros.depth_node import DepthNode
from marigold_ros.diagnostics import STAGES
from marigold_ros.geometry import CameraModel
from marigold_ros.gil import quick_gil_handover
from marigold_ros.node_params import join_topic, OutputConfig
from marigold_ros.pipeline import DepthPipeline, FrameInput, organized_cloud
import numpy as np
from PIL import Image as PILImage
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / 'marigold_model' / 'models' / 'marigold-tiny' / 'model_index.json'
WIDTH, HEIGHT = 640, 480
FRAME = 'camera_optical_frame'


def rss_mb():
    """
    Return the resident set size of this process.

    :return: megabytes
    """
    with open('/proc/self/status') as stream:
        for line in stream:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024.0
    return math.nan


def test_image():
    """
    Return a 640x480 camera image and its CameraModel (the demo sequence, upscaled).

    :return: (HxWx3 uint8, CameraModel)
    """
    sequence = load_sequence()
    rgb = np.asarray(PILImage.fromarray(sequence.rgb[0]).resize((WIDTH, HEIGHT),
                                                                PILImage.BILINEAR))
    scale = WIDTH / sequence.meta['width']
    k = np.array(sequence.meta['K'])
    k[:2] *= scale
    k[0, 2] = (sequence.meta['K'][0][2] + 0.5) * scale - 0.5
    k[1, 2] = (sequence.meta['K'][1][2] + 0.5) * scale - 0.5
    return rgb, CameraModel(WIDTH, HEIGHT, k, frame_id=FRAME)


def resolve_model(requested):
    """
    Pick the model: the requested one, the bundled tiny model, or a random stand-in.

    :param requested: model name or None
    :return: (model name, description)
    """
    if requested:
        return requested, requested
    if BUNDLED.is_file():
        return 'bundled:marigold-tiny', 'bundled tiny trained model'
    from marigold_model.architecture import build_random_marigold, TinyArchitecture
    folder = tempfile.mkdtemp(prefix='bench_node_model_')
    build_random_marigold(folder, TinyArchitecture(), seed=0)
    return folder, 'random weights, tiny architecture (bundled model not trained yet)'


# ------------------------------------------------------------------ 1 and 3: the node


def _tear_down(executor, context, *nodes):
    """Remove and destroy the nodes, stop the executor and shut the context down."""
    for node in nodes:
        executor.remove_node(node)
        node.destroy_node()
    executor.shutdown(timeout_sec=1.0)
    rclpy.shutdown(context=context)


def run_node(model, frames, log=print):
    """
    Run frames through the node in a closed loop: overhead ratio and memory.

    :param model: model name
    :param frames: number of frames
    :param log: progress printer
    :return: dict of figures
    """
    rgb, camera = test_image()
    context = rclpy.Context()
    rclpy.init(context=context)
    overrides = [Parameter('model', value=model), Parameter('device', value='cpu'),
                 Parameter('fixed_scale', value=2.0), Parameter('fixed_shift', value=0.5),
                 Parameter('input_reliability', value='reliable')]
    node = DepthNode(context=context, namespace='/bench', parameter_overrides=overrides)
    io = Node('bench_io', context=context, namespace='/bench')
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    # Every output has a subscriber, so the node builds and publishes all of them (it skips
    # outputs nobody listens to).  The subscriptions take the serialized bytes (raw): turning
    # 7 MB per frame back into Python messages is the subscribers' cost (RViz, a recorder,
    # in their own processes), not the node's, and here it would share the GIL with it.
    # The next frame goes out once every output of the previous one has been taken, so the
    # bench's own taking of outputs is never charged to the next frame's transport.
    received = {}
    for kind, topic in ((PointCloud2, 'depth/points'), (Image, 'depth/relative'),
                        (Image, 'depth/image'), (CameraInfo, 'depth/camera_info')):
        received[topic] = 0
        io.create_subscription(
            kind, topic, lambda msg, topic=topic: received.__setitem__(topic, received[topic] + 1),
            qos, raw=True)
    image_pub = io.create_publisher(Image, 'image', 5)
    info_pub = io.create_publisher(CameraInfo, 'camera_info', 5)
    executor = SingleThreadedExecutor(context=context)  # what rclpy.spin (depth_node) uses
    executor.add_node(node)
    executor.add_node(io)
    memory = []
    try:
        while node.diagnostics.model_state == 'loading':
            executor.spin_once(timeout_sec=0.05)
        if node.diagnostics.model_state != 'ready':
            raise RuntimeError(node.diagnostics.model_message)
        start = time.monotonic()
        for index in range(frames):
            header = Header(stamp=io.get_clock().now().to_msg(), frame_id=FRAME)
            info_pub.publish(camera.to_msg(header))
            image_pub.publish(rgb_to_image(rgb, header))
            deadline = time.monotonic() + 120.0
            while min(received.values()) <= index and time.monotonic() < deadline:
                executor.spin_once(timeout_sec=0.01)
            if min(received.values()) <= index:
                raise RuntimeError(f'frame {index}: outputs received {received}')
            if index % 50 == 0 or index == frames - 1:
                memory.append((index + 1, rss_mb()))
                log(f'  frame {index + 1}/{frames}  rss {memory[-1][1]:.1f} MB  '
                    f'{(time.monotonic() - start) / (index + 1):.3f} s/frame')
        recent = node.diagnostics.recent('')
        snapshot = node.diagnostics.snapshot('')
        info = dict(node.diagnostics.model_info)
    finally:
        _tear_down(executor, context, node, io)
    latency = np.array(recent['latency_s'])
    estimator = np.array(recent['estimator_s'])
    count = min(latency.size, estimator.size)
    latency, estimator = latency[-count:], estimator[-count:]
    overhead = (latency - estimator) / estimator
    after_warmup = [(i, m) for i, m in memory if i > 100] or memory
    slope = np.polyfit([i for i, _ in after_warmup], [m for _, m in after_warmup], 1)[0] \
        if len(after_warmup) > 1 else math.nan
    stages = {name: 1000 * float(np.median(recent[f'{name}_s']))
              for name in STAGES if recent[f'{name}_s']}
    return {
        'frames': frames, 'frames_in_window': int(count), 'dropped': snapshot['dropped'],
        'stages_p50_ms': stages,
        'processing_resolution': info.get('processing_resolution'),
        'denoising_steps': info.get('denoising_steps'),
        'latency_p50_ms': 1000 * float(np.median(latency)),
        'estimator_p50_ms': 1000 * float(np.median(estimator)),
        'overhead_p50': float(np.median(overhead)),
        'overhead_p95': float(np.percentile(overhead, 95)),
        'overhead_of_means': float((latency - estimator).sum() / estimator.sum()),
        'node_ms_p50': 1000 * float(np.median(latency - estimator)),
        'rss_mb': memory,
        'rss_growth_mb_after_warmup': after_warmup[-1][1] - after_warmup[0][1],
        'rss_slope_kb_per_frame': 1024 * float(slope),
    }


# ------------------------------------------------------------------ 5: against a stand-in model


def _camera_thread(publishers, rate, stop, clock):
    """Publish each camera's prebuilt camera_info and image at ``rate``, stamped now."""
    period = 1.0 / rate
    tick = time.perf_counter()
    while not stop.is_set():
        for info_pub, image_pub, info, image in publishers:
            stamp = clock.now().to_msg()
            info.header.stamp = stamp
            image.header.stamp = stamp
            info_pub.publish(info)
            image_pub.publish(image)
        tick += period
        wait = tick - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        elif wait < -period:
            tick = time.perf_counter()  # behind by a whole frame: a camera does not burst


def _camera_names(cameras):
    return [''] if cameras == 1 else [f'cam{i}' for i in range(cameras)]


def _make_io(context, names):
    """Make the bench's camera and subscriber node: (node, publishers, received counts)."""
    rgb, camera = test_image()
    io = Node('bench_io', context=context, namespace='/bench')
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    received = {}
    for name in names:
        prefix = f'{name}/' if name else ''
        for kind, topic in ((PointCloud2, 'depth/points'), (Image, 'depth/relative'),
                            (Image, 'depth/image')):
            received[prefix + topic] = 0
            io.create_subscription(
                kind, prefix + topic,
                lambda msg, key=prefix + topic: received.__setitem__(key, received[key] + 1),
                qos, raw=True)
    publishers = []
    for name in names:
        prefix = f'{name}/' if name else ''
        header = Header(stamp=io.get_clock().now().to_msg(), frame_id=FRAME)
        publishers.append((io.create_publisher(CameraInfo, prefix + 'camera_info', qos),
                           io.create_publisher(Image, prefix + 'image', qos),
                           camera.to_msg(header), rgb_to_image(rgb, header)))
    return io, publishers, received


def run_io_process(cameras, rate):
    """
    Run the camera and the subscribers alone (``--io-only``), as a driver and a viewer.

    Waits for the node's outputs, publishes at ``rate`` until standard input closes, then
    prints the received counts and this process's CPU seconds as JSON.
    """
    import sys
    import threading
    names = _camera_names(cameras)
    context = rclpy.Context()
    rclpy.init(context=context)
    io, publishers, received = _make_io(context, names)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(io)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    feeder = threading.Thread(target=_camera_thread,
                              args=(publishers, rate, stop, io.get_clock()), daemon=True)
    try:
        while not stop.is_set() and not all(
                io.count_publishers(f'/bench/{topic}') for topic in received):
            executor.spin_once(timeout_sec=0.05)
        feeder.start()
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.05)
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join(5.0)
        _tear_down(executor, context, io)
    print(json.dumps({'received': received, 'cpu_s': time.process_time()}), flush=True)


def run_stand_in(milliseconds, cameras=1, seconds=10.0, warmup_s=2.0, rate=None,
                 camera_process=False):
    """
    Run the node against StandInEstimator at a camera rate: throughput and latency.

    Open loop: every camera publishes a 640x480 rgb8 image and its camera_info at ``rate``
    (default: the model's pace, 1000 / (T x cameras) per camera: one call of N frames takes
    N x T), from its own thread, whatever the node does.  depth/image, depth/points and
    depth/relative of every camera are subscribed (raw); the node builds only those.  After
    ``warmup_s`` the frames the node publishes over ``seconds`` are counted (throughput)
    and their stamp-to-publish latencies and stages collected from the node's own
    diagnostics calls.

    :param milliseconds: the stand-in's time per frame (T)
    :param cameras: camera namespaces into the one node
    :param seconds: measuring window
    :param warmup_s: run-in before the window
    :param rate: frames per second per camera (default the model's pace)
    :param camera_process: the camera and the subscribers in a process of their own (as a
        camera driver and a viewer are), so the node's process does only the node's work
    :return: dict of figures
    """
    import subprocess
    import sys
    import threading
    from stand_in import StandInEstimator  # bench/stand_in.py, next to this file
    rate = rate or 1000.0 / (milliseconds * cameras)
    names = _camera_names(cameras)
    context = rclpy.Context()
    rclpy.init(context=context)
    overrides = [Parameter('model', value='stand-in'), Parameter('device', value='cpu'),
                 Parameter('fixed_scale', value=2.0), Parameter('fixed_shift', value=0.5),
                 Parameter('input_reliability', value='reliable'),
                 Parameter('warmup', value=False), Parameter('cameras', value=names)]
    node = DepthNode(context=context, namespace='/bench', parameter_overrides=overrides,
                     estimator_factory=lambda config: StandInEstimator(milliseconds, config),
                     load_async=False)
    if camera_process:
        io = publishers = received = None
        child = subprocess.Popen(
            [sys.executable, __file__, '--io-only', '--cameras', str(cameras), '--rate',
             str(rate)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    else:
        io, publishers, received = _make_io(context, names)
    published = []  # (monotonic time, camera, latency s, stages) per frame published
    record = node.diagnostics.frame_published

    def recorded(key, latency_s, estimator_s, notes=(), scale=None, now=None, stages=None):
        published.append((time.monotonic(), key, latency_s, dict(stages or {})))
        record(key, latency_s, estimator_s, notes, scale, now, stages)

    node.diagnostics.frame_published = recorded
    executor = SingleThreadedExecutor(context=context)  # what rclpy.spin (depth_node) uses
    executor.add_node(node)
    stop = threading.Event()
    if not camera_process:
        executor.add_node(io)
        feeder = threading.Thread(target=_camera_thread,
                                  args=(publishers, rate, stop, io.get_clock()), daemon=True)
    try:
        # Every subscription matched before the first frame (nothing lost to discovery).
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and not (
                all(node.count_publishers(join_topic('/bench', join_topic(n, 'image')))
                    for n in names) and
                all(node._outputs[n][o].get_subscription_count()
                    for n in names for o in ('relative', 'metric', 'points'))):
            executor.spin_once(timeout_sec=0.05)
        load = os.getloadavg()[0]
        if not camera_process:
            feeder.start()
        begin = time.monotonic() + warmup_s
        end = begin + seconds
        start_counts = None
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.01)
            if start_counts is None and time.monotonic() >= begin:
                start_counts = {n: node.diagnostics.snapshot(n) for n in names}
                cpu = time.process_time()
        cpu = time.process_time() - cpu
        end_counts = {n: node.diagnostics.snapshot(n) for n in names}
    finally:
        stop.set()
        if camera_process:
            io_figures = json.loads(child.communicate('', timeout=60)[0].strip().splitlines()[-1])
            received = io_figures['received']
            _tear_down(executor, context, node)
        else:
            io_figures = None
            if feeder.is_alive():
                feeder.join(5.0)
            _tear_down(executor, context, node, io)
    window = [p for p in published if begin <= p[0] < end]
    latency = np.array([p[2] for p in window])
    # The diagnostics stages, and the wait between the model and the finisher thread.
    stages = {name: 1000 * float(np.median([p[3][name] for p in window if name in p[3]]))
              for name in STAGES + ('handoff', 'match') if any(name in p[3] for p in window)}
    sent = sum(end_counts[n]['received'] - start_counts[n]['received'] for n in names)
    dropped = sum(end_counts[n]['dropped'] - start_counts[n]['dropped'] for n in names)
    fps = len(window) / seconds
    model_fps = 1000.0 / milliseconds  # frames per second the stand-in can take in all
    offered = min(rate * cameras, model_fps)
    return {
        'stand_in_ms': milliseconds, 'cameras': cameras, 'rate_per_camera': rate,
        'load_1min': load, 'seconds': seconds, 'frames_published': len(window),
        'frames_received': int(sent), 'frames_dropped': int(dropped),
        'throughput_fps': fps, 'model_fps': model_fps, 'throughput_ratio': fps / offered,
        'latency_p50_ms': 1000 * float(np.median(latency)) if latency.size else math.nan,
        'latency_p95_ms': 1000 * float(np.percentile(latency, 95)) if latency.size
        else math.nan,
        'latency_minus_model_p50_ms': 1000 * float(np.median(latency)) -
        milliseconds * cameras if latency.size else math.nan,
        'stages_p50_ms': stages,
        # CPU of the whole process (node, camera thread, subscribers) per frame published:
        # what the shared machine's load cannot inflate much; 1000 / it is the rate two
        # idle cores could reach at best.
        'cpu_ms_per_frame': 1000 * cpu / max(1, len(window)),
        'camera_process': camera_process,
        # the camera and subscriber process: its CPU over its whole life (not only the window)
        'io_process_cpu_s': io_figures['cpu_s'] if io_figures else None,
        'outputs_received': dict(received),
    }


def print_stand_in(result):
    """Print the figures of one stand-in run."""
    r = result
    print(f"stand-in {r['stand_in_ms']:g} ms/frame, {r['cameras']} camera(s) at "
          f"{r['rate_per_camera']:.1f} fps each (load {r['load_1min']:.1f}): "
          f"{r['throughput_fps']:.1f} fps published of {r['model_fps']:.1f} the model can "
          f"take, ratio {r['throughput_ratio']:.3f} (target >= 0.95); "
          f"{r['frames_received']} received, {r['frames_dropped']} dropped")
    print(f"  latency stamp->publish p50 {r['latency_p50_ms']:.2f} ms (p95 "
          f"{r['latency_p95_ms']:.2f}), minus the model's {r['stand_in_ms'] * r['cameras']:g}"
          f" ms per call: {r['latency_minus_model_p50_ms']:.2f} ms (target <= 4)")
    print('  stages p50 (ms): ' + ', '.join(
        f'{name} {ms:.2f}' for name, ms in r['stages_p50_ms'].items()) +
        f"; {'node ' if r['camera_process'] else ''}process CPU "
        f"{r['cpu_ms_per_frame']:.2f} ms per frame published" +
        (' (camera and subscribers in their own process)' if r['camera_process'] else
         ' (node, camera and subscribers)'))


# ------------------------------------------------------------------ 2: conversion and cloud


class InstantEstimator:
    """Return a fixed relative depth at once (only the node's own work is timed)."""

    def __init__(self, depth):
        """Keep the depth to return."""
        self.depth = depth

    def estimate(self, frames, keys=None):
        """Return the fixed depth for every frame."""
        return [DepthResult(self.depth, None, {'total': 0.0}, self.depth.shape)
                for _ in frames]


def run_conversions(repeats=30):
    """
    Time the node's own per-frame work, and its cloud builder against the reference.

    :param repeats: frames timed for the fast path
    :return: dict of figures
    """
    rgb, camera = test_image()
    v, u = np.mgrid[0:HEIGHT, 0:WIDTH]
    relative = (0.3 + 0.0005 * u + 0.0003 * v).astype(np.float32)
    header = Header(stamp=rclpy.time.Time(seconds=1).to_msg(), frame_id=FRAME)
    frame = FrameInput(rgb_to_image(rgb, header), camera.to_msg(header))
    pipeline = DepthPipeline(InstantEstimator(relative), OutputConfig(fixed_scale=2.0))
    for _ in range(3):
        pipeline.process([frame])
    times, decode, outputs = [], [], []
    for _ in range(repeats):
        clock = time.perf_counter()
        (result,) = pipeline.process([frame])
        times.append(time.perf_counter() - clock)
        decode.append(result.timings['decode'])
        outputs.append(result.timings['outputs'])
    assert result.points is not None and result.metric is not None
    metric = 2.0 * relative
    reference = reference_cloud(metric, camera, rgb, header)
    assert bytes(reference.data) == bytes(result.points.data)
    cloud_ms = median_ms(lambda: organized_cloud(metric, camera, rgb, header), repeats)
    reference_ms = median_ms(lambda: reference_cloud(metric, camera, rgb, header), repeats)
    return {
        'node_work_ms': 1000 * float(np.median(times)),
        'decode_ms': 1000 * float(np.median(decode)),
        'outputs_ms': 1000 * float(np.median(outputs)),
        'cloud_ms': cloud_ms, 'reference_cloud_ms': reference_ms,
        'speedup': reference_ms / cloud_ms,
    }


# ------------------------------------------------------------------ 4: what rclpy alone costs


def run_transfer_floor(repeats=100):
    """
    Time rclpy moving one frame's messages, with no node work at all.

    The prebuilt outputs of a 640x480 frame (relative and metric depth, camera info, cloud)
    are published to raw subscribers in this process, and the camera image is published,
    taken and deserialized by a plain subscription, as the node's would be: the part of
    the node overhead that no change inside the node can remove.

    :param repeats: frames timed
    :return: dict of figures (ms, medians)
    """
    rgb, camera = test_image()
    v, u = np.mgrid[0:HEIGHT, 0:WIDTH]
    depth = (1.0 + 0.001 * u + 0.001 * v).astype(np.float32)
    header = Header(stamp=rclpy.time.Time(seconds=1).to_msg(), frame_id=FRAME)
    pipeline = DepthPipeline(InstantEstimator(depth), OutputConfig(fixed_scale=1.0))
    (result,) = pipeline.process([FrameInput(rgb_to_image(rgb, header), camera.to_msg(header))])
    outputs = {'depth/relative': result.relative, 'depth/image': result.metric,
               'depth/camera_info': result.camera_info, 'depth/points': result.points}
    context = rclpy.Context()
    rclpy.init(context=context)
    source = Node('floor_out', context=context, namespace='/floor')
    sink = Node('floor_in', context=context, namespace='/floor')
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    taken = []
    publishers = {}
    for topic, msg in outputs.items():
        sink.create_subscription(type(msg), topic, taken.append, qos, raw=True)
        publishers[topic] = source.create_publisher(type(msg), topic, qos)
    sink.create_subscription(Image, 'image', taken.append, qos)
    image_pub = source.create_publisher(Image, 'image', qos)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(source)
    executor.add_node(sink)
    publish, image_in = [], []
    try:
        for _ in range(10):
            executor.spin_once(timeout_sec=0.05)
        for index in range(repeats + 5):
            clock = time.perf_counter()
            for topic, msg in outputs.items():
                publishers[topic].publish(msg)
            published = time.perf_counter() - clock
            while len(taken) < len(outputs):
                executor.spin_once(timeout_sec=0.05)
            taken.clear()
            clock = time.perf_counter()
            image_pub.publish(rgb_to_image(rgb, header))
            while not taken:
                executor.spin_once(timeout_sec=0.05)
            arrived = time.perf_counter() - clock
            taken.clear()
            if index >= 5:
                publish.append(published)
                image_in.append(arrived)
    finally:
        executor.shutdown(timeout_sec=1.0)
        source.destroy_node()
        sink.destroy_node()
        rclpy.shutdown(context=context)
    return {'publish_outputs_ms': 1000 * float(np.median(publish)),
            'image_in_ms': 1000 * float(np.median(image_in)),
            'output_mb': sum(len(m.data) for m in outputs.values()
                             if hasattr(m, 'data')) / 1e6}


def main(argv=None):
    """
    Run the four measurements and print them.

    :param argv: argument list (default sys.argv)
    :return: exit code
    """
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--frames', type=int, default=1000)
    parser.add_argument('--model', default=None,
                        help='model (default: bundled tiny model, else random weights)')
    parser.add_argument('--json', default=None, help='also write the figures here')
    parser.add_argument('--stand-in-ms', type=float, nargs='+', default=None, metavar='T',
                        help='instead of the model: bench/stand_in.py taking T ms per frame '
                             '(several values: one run each); throughput and latency at a '
                             'camera rate of 1000 / T fps')
    parser.add_argument('--cameras', type=int, default=1,
                        help='with --stand-in-ms: camera namespaces into the one node')
    parser.add_argument('--rate', type=float, default=None,
                        help='with --stand-in-ms: fps per camera (default 1000 / (T x '
                             'cameras), the pace of the model)')
    parser.add_argument('--seconds', type=float, default=10.0,
                        help='with --stand-in-ms: measuring window per run')
    parser.add_argument('--camera-process', action='store_true',
                        help='with --stand-in-ms: the camera and the subscribers in a '
                             'process of their own (as a driver and a viewer would be)')
    parser.add_argument('--io-only', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.camera_process or args.io_only:
        # two processes must discover each other: this host only, a domain of their own
        os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
        os.environ.setdefault('ROS_DOMAIN_ID', str(50 + os.getpid() % 50))
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'OFF')
    if args.io_only:
        run_io_process(args.cameras, args.rate)
        return 0
    if args.stand_in_ms:
        floor = run_transfer_floor()
        print(f"rclpy alone, no node work: publishing one frame's outputs "
              f"({floor['output_mb']:.1f} MB) {floor['publish_outputs_ms']:.2f} ms, an image "
              f"in (build, publish, take, deserialize) {floor['image_in_ms']:.2f} ms")
        results = []
        for milliseconds in args.stand_in_ms:
            with quick_gil_handover():  # as depth_node's main does
                results.append(run_stand_in(milliseconds, args.cameras, args.seconds,
                                            rate=args.rate, camera_process=args.camera_process))
            print_stand_in(results[-1])
        if args.json:
            Path(args.json).write_text(json.dumps({'transfer_floor': floor,
                                                   'stand_in': results}, indent=2))
        return 0
    model, description = resolve_model(args.model)
    print(f'model: {description}\nimage {WIDTH}x{HEIGHT}, CPU, {args.frames} frames')
    conversions = run_conversions()
    print(f"node's own work per frame (decode + all outputs incl. cloud): "
          f"{conversions['node_work_ms']:.2f} ms (decode {conversions['decode_ms']:.2f}, "
          f"outputs {conversions['outputs_ms']:.2f}); its cloud "
          f"{conversions['cloud_ms']:.2f} ms against {conversions['reference_cloud_ms']:.2f} "
          f"ms for the create_cloud reference: {conversions['speedup']:.1f}x faster (medians)")
    floor = run_transfer_floor()
    print(f"rclpy alone, no node work: publishing one frame's outputs "
          f"({floor['output_mb']:.1f} MB) {floor['publish_outputs_ms']:.2f} ms, an image in "
          f"(build, publish, take, deserialize) {floor['image_in_ms']:.2f} ms")
    with quick_gil_handover():  # as depth_node's main does
        node = run_node(model, args.frames)
    verdict = 'OK' if node['overhead_p50'] <= 0.05 else 'ABOVE TARGET'
    print(f"processing resolution {node['processing_resolution']}, "
          f"{node['denoising_steps']} steps; last {node['frames_in_window']} frames:")
    print(f"  latency p50 {node['latency_p50_ms']:.1f} ms, estimator p50 "
          f"{node['estimator_p50_ms']:.1f} ms, node share p50 {node['node_ms_p50']:.1f} ms")
    print('  stages p50 (ms): ' + ', '.join(
        f'{name} {ms:.2f}' for name, ms in node['stages_p50_ms'].items()))
    print(f"  node overhead p50 {node['overhead_p50']:.4f} (p95 {node['overhead_p95']:.4f}, "
          f"of means {node['overhead_of_means']:.4f}); target <= 0.05: {verdict}")
    print(f"  memory: {node['rss_mb'][0][1]:.1f} MB after frame 1, "
          f"{node['rss_mb'][-1][1]:.1f} MB after frame {node['rss_mb'][-1][0]}; "
          f"growth after warm-up {node['rss_growth_mb_after_warmup']:+.1f} MB "
          f"({node['rss_slope_kb_per_frame']:+.2f} KB/frame)")
    if args.json:
        Path(args.json).write_text(json.dumps({'model': description, 'conversions':
                                               conversions, 'transfer_floor': floor,
                                               'node': node}, indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
