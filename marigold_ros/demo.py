"""
``make demo``: the live depth node on a bundled camera sequence, and pictures to look at.

Starts the ``marigold_depth`` node in this process with the bundled tiny trained model, plays
the sample sequence of marigold_ros/samples into it at camera rate (images, camera_info and
a sparse depth sensor for the metric scale, all through ROS topics), and writes what the node
publishes to ``--output``: per-frame pictures (RGB | relative | metric | ground truth), the
last point cloud as PLY and as a picture, and a summary (frames, drops, latency, scale,
accuracy against the ground truth).

A randomly initialised model would make meaningless pictures, so the demo refuses to run
without the trained tiny model (``make train-tiny``) unless ``--model`` names other weights.
"""

import argparse
from dataclasses import dataclass
import json
from pathlib import Path
import sys
import time

from marigold_model.alignment import AlignmentError, depth_metrics, evaluate_affine_invariant
from marigold_model.config import BUNDLED_TINY_MODEL
from marigold_model.data.synthetic import colorize_depth
import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header

from .conversions import image_to_depth, pointcloud2_to_xyz, rgb_to_image
from .depth_node import DepthNode
from .export import write_ply
from .geometry import CameraModel
from .stamp_matcher import stamp_to_ns

SAMPLES = Path(__file__).resolve().parent / 'samples'
NAMESPACE = '/camera'
#: scale_recovery.inlier_threshold_rel for the tiny models: the node's default (10 %) suits
#: real Marigold; too few of a tiny model's points agree with any line but a flat one at 10 %.
TINY_INLIER_THRESHOLD = 0.3
_BACKGROUND = (32, 32, 36)


class DemoError(RuntimeError):
    """The demo cannot run (missing model or samples); the message says what to do."""


@dataclass
class Sequence:
    """
    The bundled camera sequence.

    :param meta: sequence.json (size, K, rate_hz, frame_id, ...)
    :param rgb: list of HxWx3 uint8 images
    :param depth: list of HxW float32 exact depth in meters (NaN = no hit)
    :param sparse: list of (u, v, depth_m) arrays per frame
    """

    meta: dict
    rgb: list
    depth: list
    sparse: list

    @property
    def camera(self):
        """Return the CameraModel of the sequence."""
        return CameraModel(self.meta['width'], self.meta['height'], self.meta['K'],
                           frame_id=self.meta['frame_id'])

    def sparse_image(self, index):
        """Return the sparse depth of frame ``index`` as HxW 16UC1 millimeters (0 = none)."""
        u, v, depth = self.sparse[index]
        out = np.zeros((self.meta['height'], self.meta['width']), np.uint16)
        out[v, u] = np.clip(np.rint(depth * 1000.0), 1, 65535).astype(np.uint16)
        return out


def load_sequence(folder=SAMPLES):
    """Read the Sequence written by samples/make_sample_sequence.py; DemoError if missing."""
    folder = Path(folder)
    if not (folder / 'sequence.json').is_file():
        raise DemoError(f'no sample sequence in {folder}; regenerate it with: python '
                        'marigold_ros/samples/make_sample_sequence.py')
    meta = json.loads((folder / 'sequence.json').read_text())
    rgb, depth, sparse = [], [], []
    packed = np.load(folder / 'sparse.npz')
    for index in range(meta['frames']):
        rgb.append(np.asarray(PILImage.open(folder / f'rgb_{index:04d}.jpg').convert('RGB')))
        millimeters = np.asarray(PILImage.open(folder / f'depth_{index:04d}.png'))
        meters = millimeters.astype(np.float32) / 1000.0
        meters[millimeters == 0] = np.nan
        depth.append(meters)
        pick = packed['frame'] == index
        sparse.append((packed['u'][pick], packed['v'][pick], packed['depth_m'][pick]))
    return Sequence(meta, rgb, depth, sparse)


def check_model(model):
    """Raise DemoError, with the command that makes it, if the demo's model is not here."""
    from marigold_model.loading import resolve_model_path, WeightsNotFoundError
    try:
        resolve_model_path(model)
    except WeightsNotFoundError as error:
        if model == BUNDLED_TINY_MODEL:
            raise DemoError(
                'The demo needs the bundled tiny trained model (marigold_model/models/'
                'marigold-tiny), which is not there yet.\nTrain it once with:\n\n'
                '    make train-tiny\n\n(about half an hour on a CPU), then run `make demo` '
                'again.  A randomly initialised model would only make noise.') from error
        raise DemoError(str(error)) from error


# ------------------------------------------------------------------ pictures


def labelled_row(panels):
    """Put (caption, HxWx3 uint8) panels side by side, a caption strip above each; return PIL."""
    height, width = panels[0][1].shape[:2]
    strip = 18
    canvas = PILImage.new('RGB', (width * len(panels), height + strip), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for index, (caption, pixels) in enumerate(panels):
        canvas.paste(PILImage.fromarray(pixels), (index * width, strip))
        draw.text((index * width + 4, 3), caption, fill=(230, 230, 230))
    return canvas


def _rotation(yaw_deg, pitch_deg):
    yaw, pitch = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    about_y = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0],
                        [-np.sin(yaw), 0, np.cos(yaw)]])
    about_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)],
                        [0, np.sin(pitch), np.cos(pitch)]])
    return about_y @ about_x


def render_cloud(points, colours, K, width, height, yaw_deg=30.0, pitch_deg=-20.0,
                 back=1.5, splat=3):
    """
    Draw a coloured cloud from a viewpoint beside the camera (numpy z-buffer splatting).

    The virtual camera orbits the cloud's median point by ``yaw_deg`` about the vertical
    (optical y) axis and ``pitch_deg`` about x (negative: from above), steps back to
    ``back`` times its distance from that point, then looks at it with the intrinsics ``K``;
    points are square splats of ``splat`` pixels drawn far to near.

    :param points: (N, 3) points in the camera optical frame (meters), NaN allowed
    :param colours: (N, 3) uint8
    :return: HxWx3 uint8 picture
    """
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    rgb = np.asarray(colours, np.uint8).reshape(-1, 3)
    keep = np.isfinite(pts).all(axis=1)
    pts, rgb = pts[keep], rgb[keep]
    image = np.empty((height, width, 3), np.uint8)
    image[:] = _BACKGROUND
    if pts.shape[0] == 0:
        return image
    pivot = np.median(pts, axis=0)
    # Rotating the cloud about the pivot by R^T = moving the camera around it by R.
    view = (pts - pivot) @ _rotation(yaw_deg, pitch_deg) + pivot
    view[:, 2] += (back - 1.0) * pivot[2]
    z = view[:, 2]
    front = z > 1e-3
    view, rgb, z = view[front], rgb[front], z[front]
    u = np.rint(K[0, 0] * view[:, 0] / z + K[0, 2]).astype(np.int64)
    v = np.rint(K[1, 1] * view[:, 1] / z + K[1, 2]).astype(np.int64)
    order = np.argsort(-z, kind='stable')  # far first: nearer points overwrite them
    u, v, rgb = u[order], v[order], rgb[order]
    for dv in range(splat):
        for du in range(splat):
            uu, vv = u + du, v + dv
            inside = (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
            image[vv[inside], uu[inside]] = rgb[inside]
    return image


def cloud_arrays(msg):
    """Return (H * W, 3) float32 points and uint8 colours of the node's x y z rgb PointCloud2."""
    points = pointcloud2_to_xyz(msg)
    packed = np.frombuffer(bytes(msg.data), '<u4').reshape(-1, msg.point_step // 4)[:, 3]
    colours = np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=1)
    return points, colours.astype(np.uint8)


# ------------------------------------------------------------------ the ROS part


class Recorder(Node):
    """Subscribe to the node's outputs and keep them by image stamp."""

    def __init__(self, context):
        """Subscribe to depth/relative, depth/image and depth/points of the camera."""
        super().__init__('marigold_demo_recorder', context=context, namespace=NAMESPACE)
        self.messages = {}
        self.received_at = {}
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        for name, msg_type in (('depth/relative', Image), ('depth/image', Image),
                               ('depth/points', PointCloud2)):
            self.create_subscription(msg_type, name,
                                     lambda msg, name=name: self._store(name, msg), qos)

    def _store(self, name, msg):
        stamp = stamp_to_ns(msg.header.stamp)
        self.messages.setdefault(stamp, {})[name] = msg
        if name == 'depth/relative':
            self.received_at[stamp] = self.get_clock().now().nanoseconds


class Player(Node):
    """Publish the sequence at camera rate: camera_info, sparse depth, then the image."""

    def __init__(self, context, sequence):
        """Create the publishers and the camera-rate timer."""
        super().__init__('marigold_demo_camera', context=context, namespace=NAMESPACE)
        self.sequence = sequence
        self.camera = sequence.camera
        self.sent = {}  # stamp ns -> frame index
        self.next_index = 0
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.image_pub = self.create_publisher(Image, 'image', qos)
        self.info_pub = self.create_publisher(CameraInfo, 'camera_info', qos)
        self.sparse_pub = self.create_publisher(Image, 'sparse_depth', qos)
        self.timer = self.create_timer(1.0 / sequence.meta['rate_hz'], self._tick)

    @property
    def done(self):
        """Return True when every frame was published."""
        return self.next_index >= len(self.sequence.rgb)

    def _tick(self):
        if self.done:
            self.timer.cancel()
            return
        index = self.next_index
        self.next_index += 1
        header = Header(stamp=self.get_clock().now().to_msg(),
                        frame_id=self.sequence.meta['frame_id'])
        self.info_pub.publish(self.camera.to_msg(header))
        sparse = Image(header=header, height=self.camera.height, width=self.camera.width,
                       encoding='16UC1', is_bigendian=0, step=2 * self.camera.width,
                       data=self.sequence.sparse_image(index).astype('<u2').tobytes())
        self.sparse_pub.publish(sparse)
        self.image_pub.publish(rgb_to_image(self.sequence.rgb[index], header))
        self.sent[stamp_to_ns(header.stamp)] = index


def run_graph(sequence, model, device='auto', processing_resolution=0, inlier_threshold=None,
              log=print, timeout=600.0):
    """
    Run node, camera player and recorder in one process until every frame is handled.

    :param processing_resolution: 0 = the model's default
    :param inlier_threshold: scale_recovery.inlier_threshold_rel (None: the node's default)
    :param timeout: seconds before giving up
    :return: (recorder messages by stamp, player's stamp -> index, node counters, model
        info dict, settings dict)
    """
    context = rclpy.Context()
    rclpy.init(context=context)
    overrides = [Parameter('model', value=model), Parameter('device', value=device),
                 Parameter('processing_resolution', value=processing_resolution),
                 Parameter('scale_recovery.source', value='sparse_depth'),
                 Parameter('input_reliability', value='reliable')]
    if inlier_threshold is not None:
        overrides.append(Parameter('scale_recovery.inlier_threshold_rel',
                                   value=float(inlier_threshold)))
    node = DepthNode(context=context, namespace=NAMESPACE, parameter_overrides=overrides)
    recorder = Recorder(context)
    executor = SingleThreadedExecutor(context=context)
    player = None
    try:
        executor.add_node(node)
        executor.add_node(recorder)
        log(f'loading {model} ...')
        deadline = time.monotonic() + timeout
        while node.diagnostics.model_state in ('loading', 'unconfigured'):
            if time.monotonic() > deadline:
                raise DemoError(f'the model did not load within {timeout:.0f} s')
            executor.spin_once(timeout_sec=0.05)
        if node.diagnostics.model_state != 'ready':
            raise DemoError(f'the model did not load: {node.diagnostics.model_message}')
        log(f'playing {len(sequence.rgb)} frames at {sequence.meta["rate_hz"]} Hz ...')
        player = Player(context, sequence)
        executor.add_node(player)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.02)
            counters = node.diagnostics.snapshot('')
            handled = counters['published'] + counters['dropped'] + sum(
                counters['bad'].values())
            if player.done and handled >= len(player.sent) and \
                    len(recorder.messages) >= counters['published']:
                break
        # Let the last outputs arrive.
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.02)
        counters = node.diagnostics.snapshot('')
        info = dict(node.diagnostics.model_info)
        # Resolved by the model (0 = the model's default in the parameters).
        settings = {p: info.get(p, node.get_parameter(p).value) for p in (
            'processing_resolution', 'denoising_steps', 'ensemble_size',
            'scale_recovery.inlier_threshold_rel')}
        settings['scale'] = node.scale_source.diagnostic_fields('')
        return recorder.messages, dict(player.sent), counters, info, settings
    finally:
        for item in (player, recorder, node):
            if item is not None:
                executor.remove_node(item)
                item.destroy_node()
        executor.shutdown(timeout_sec=1.0)
        rclpy.shutdown(context=context)


# ------------------------------------------------------------------ outputs


def _metrics(pred, gt):
    try:
        return depth_metrics(pred, gt, np.isfinite(pred) & np.isfinite(gt))
    except AlignmentError:
        return None


def write_outputs(folder, sequence, messages, sent, counters, info, settings, model):
    """
    Write the frame pictures, the cloud, its picture and the summary; return the summary.

    :param messages: stamp ns -> {'depth/relative': Image, 'depth/image': ..., ...}
    :param sent: stamp ns -> frame index
    :param counters: node counters (DiagnosticsCollector.snapshot)
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob('frame_*.png'):  # an earlier run's pictures are not this run's
        old.unlink()
    valid_gt = np.concatenate([d[np.isfinite(d)] for d in sequence.depth])
    low, high = np.percentile(valid_gt, [1, 99])
    files, metric_scores, aligned_scores, last_cloud = [], [], [], None
    constant_scores = []  # the baseline: every pixel at the median sparse reading
    for stamp in sorted(messages):
        outputs = messages[stamp]
        index = sent.get(stamp)
        if index is None or 'depth/relative' not in outputs:
            continue
        gt = sequence.depth[index]
        relative = image_to_depth(outputs['depth/relative'])
        panels = [('camera image', sequence.rgb[index]),
                  ('relative depth (not meters)',
                   colorize_depth(relative, np.isfinite(relative)))]
        if 'depth/image' in outputs:
            metric = image_to_depth(outputs['depth/image'])
            panels.append((f'metric depth {low:.1f}-{high:.1f} m',
                           colorize_depth(metric, np.isfinite(metric), (low, high))))
            scores = _metrics(metric, gt)
            if scores:
                metric_scores.append(scores)
            sparse = sequence.sparse[index][2]
            scores = _metrics(np.full(gt.shape, np.median(sparse)), gt)
            if scores:
                constant_scores.append(scores)
        try:
            aligned_scores.append(evaluate_affine_invariant(relative, gt))
        except (AlignmentError, ValueError):
            pass
        panels.append(('ground truth', colorize_depth(gt, np.isfinite(gt), (low, high))))
        path = folder / f'frame_{index:04d}.png'
        labelled_row(panels).save(path)
        files.append(path.name)
        if 'depth/points' in outputs:
            last_cloud = outputs['depth/points']
    summary_cloud = None
    if last_cloud is not None:
        points, colours = cloud_arrays(last_cloud)
        count = write_ply(folder / 'cloud.ply', points, colours)
        camera = sequence.camera
        scale = 2
        k = camera.K.copy()
        k[:2] *= scale
        picture = render_cloud(points, colours, k, camera.width * scale,
                               camera.height * scale)
        labelled_row([('point cloud, seen from 30 deg to the side and above', picture)]).save(
            folder / 'cloud.png')
        files += ['cloud.ply', 'cloud.png']
        summary_cloud = {'points': count, 'stamp_ns': stamp_to_ns(last_cloud.header.stamp),
                         'frame_id': last_cloud.header.frame_id}

    def mean(scores, key):
        return float(np.mean([s[key] for s in scores])) if scores else None

    summary = {
        'model': model, 'device': info.get('device'), 'dtype': info.get('dtype'),
        'settings': {k: v for k, v in settings.items() if k != 'scale'},
        'camera': {'width': sequence.meta['width'], 'height': sequence.meta['height'],
                   'rate_hz': sequence.meta['rate_hz']},
        'frames': {'sent': len(sent), 'received_by_node': counters['received'],
                   'published': counters['published'], 'dropped': counters['dropped'],
                   'bad': counters['bad'], 'pictures': len(files) - (2 if last_cloud else 0)},
        'latency_ms': {'p50': _ms(counters['latency_p50_s']),
                       'p95': _ms(counters['latency_p95_s'])},
        'estimator_ms_p50': _ms(counters['estimator_p50_s']),
        'metric_scale': dict(settings.get('scale') or []),
        'accuracy': {
            'metric_abs_rel': mean(metric_scores, 'abs_rel'),
            'metric_delta1': mean(metric_scores, 'delta1'),
            'constant_median_sparse_abs_rel': mean(constant_scores, 'abs_rel'),
            'constant_median_sparse_delta1': mean(constant_scores, 'delta1'),
            'relative_aligned_abs_rel': mean(aligned_scores, 'abs_rel'),
            'relative_aligned_delta1': mean(aligned_scores, 'delta1'),
            'frames': len(aligned_scores),
        },
        'cloud': summary_cloud,
        'files': files,
    }
    (folder / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    (folder / 'summary.md').write_text(summary_markdown(summary))
    return summary


def _ms(seconds):
    return None if seconds is None or not np.isfinite(seconds) else round(1000.0 * seconds, 1)


def _fmt(value, digits=3):
    return 'n/a' if value is None else f'{value:.{digits}f}'


def summary_markdown(summary):
    """Render the summary dict (summary.json) as Markdown for people."""
    frames, accuracy = summary['frames'], summary['accuracy']
    scale = summary['metric_scale']
    lines = [
        '# marigold_depth demo',
        '',
        f"Model `{summary['model']}` on {summary['device']} ({summary['dtype']}), "
        f"settings {summary['settings']}.",
        f"Camera {summary['camera']['width']}x{summary['camera']['height']} played at "
        f"{summary['camera']['rate_hz']} Hz into the node through ROS topics.",
        '',
        '| | |', '|---|---|',
        f"| frames sent / received by the node | {frames['sent']} / "
        f"{frames['received_by_node']} |",
        f"| frames published | {frames['published']} |",
        '| frames dropped (newer frame arrived while the model was busy) | '
        f"{frames['dropped']} |",
        f"| bad messages | {frames['bad'] or 'none'} |",
        f"| latency image stamp -> publish, p50 / p95 | {summary['latency_ms']['p50']} / "
        f"{summary['latency_ms']['p95']} ms |",
        f"| estimator time p50 | {summary['estimator_ms_p50']} ms |",
        f"| metric scale (sparse depth, 0.5 % of pixels) | {scale.get('scale_status', 'n/a')}"
        f": depth = {scale.get('scale', 'n/a')} * relative + {scale.get('scale_shift', 'n/a')}"
        ' m |',
        '| metric depth vs ground truth: AbsRel / delta1 | '
        f"{_fmt(accuracy['metric_abs_rel'])} / {_fmt(accuracy['metric_delta1'])} |",
        '| baseline: a constant depth, the median sparse reading: AbsRel / delta1 | '
        f"{_fmt(accuracy['constant_median_sparse_abs_rel'])} / "
        f"{_fmt(accuracy['constant_median_sparse_delta1'])} |",
        '| relative depth, per-frame least-squares aligned: AbsRel / delta1 | '
        f"{_fmt(accuracy['relative_aligned_abs_rel'])} / "
        f"{_fmt(accuracy['relative_aligned_delta1'])} |",
        '',
        'Files: `frame_NNNN.png` (camera | relative depth | metric depth | ground truth), '
        '`cloud.ply` (last frame, meters, RGB), `cloud.png` (that cloud from the side), '
        '`summary.json`.',
        '',
        'The tiny model is a small demo model trained on a 2-core CPU (its model card gives '
        'the recipe and its accuracy): expect blurry depth that gets the layout right; real '
        'use takes Marigold v1-1 on a GPU. One room says little about a model: '
        '`bench/sequences.py` plays this demo in many.',
    ]
    return '\n'.join(lines) + '\n'


def run_demo(output, model=BUNDLED_TINY_MODEL, device='auto', processing_resolution=0,
             samples=SAMPLES, inlier_threshold=None, log=print):
    """
    Run the whole demo; return the summary dict (DemoError: no model or samples).

    :param inlier_threshold: the scale fit's relative inlier threshold; None: 0.3 for the
        bundled tiny model, the node's default for any other (see TINY_INLIER_THRESHOLD)
    """
    check_model(model)
    sequence = load_sequence(samples)
    if inlier_threshold is None and model == BUNDLED_TINY_MODEL:
        inlier_threshold = TINY_INLIER_THRESHOLD
    messages, sent, counters, info, settings = run_graph(
        sequence, model, device, processing_resolution, inlier_threshold, log)
    summary = write_outputs(output, sequence, messages, sent, counters, info, settings, model)
    log(summary_markdown(summary))
    log(f'wrote {len(summary["files"])} files to {output}')
    return summary


def main(argv=None):
    """Run ``marigold_demo`` with ``argv`` (default sys.argv); return the exit code."""
    parser = argparse.ArgumentParser(description='Run the marigold_depth node on the bundled '
                                     'sample sequence and write pictures and a summary.')
    parser.add_argument('--output', default='demo_output', help='output folder')
    parser.add_argument('--model', default=BUNDLED_TINY_MODEL,
                        help='model (default: the bundled tiny trained model)')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    parser.add_argument('--processing-resolution', type=int, default=0,
                        help="longest side fed to the model (0: the model's default)")
    parser.add_argument('--samples', default=str(SAMPLES),
                        help='sequence folder written by make_sample_sequence.py (default: '
                        'the bundled one)')
    parser.add_argument('--inlier-threshold', type=float, default=None,
                        help='relative inlier threshold of the metric scale fit; give '
                        f'{TINY_INLIER_THRESHOLD} for any tiny model (default: that for the '
                        "bundled one, the node's default for others)")
    args = parser.parse_args(argv)
    try:
        run_demo(args.output, args.model, args.device, args.processing_resolution,
                 args.samples, args.inlier_threshold)
    except DemoError as error:
        print(f'marigold demo: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
