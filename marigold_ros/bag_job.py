"""
What a bag run is asked to do (``process_bag``'s options, the run's configs) and its summary.

:class:`BagJob` is the command line of ``process_bag`` (``process_bags`` takes the same
options from :func:`add_job_options`); the run itself is :mod:`marigold_ros.bag_processor`.
"""

import argparse
from dataclasses import dataclass, field, fields, MISSING
import math

from marigold_model.config import EstimatorConfig, GuidanceConfig, InferenceConfig
from marigold_model.config import ModelConfig, override

from .bag_io import BagError, STORAGES
from .node_params import estimator_config, NodeConfig, OutputConfig
from .scale_recovery import ScaleRecoveryConfig

# Camera info is matched like the node does; a bag has every message, so the buffers only
# need to hold what the look-ahead window can bring in, and are made large for that.
OFFLINE_QUEUE = 1024


@dataclass(frozen=True)
class BagJob:
    """
    What to process and how (the command-line options).

    :param input: input bag (rosbag2 directory, .db3 / .mcap file or ROS 1 .bag)
    :param output: output rosbag2 folder (must not exist unless ``overwrite``)
    :param image_topic: image topic (Image or CompressedImage); None: the only one in the bag
    :param camera_info_topic: CameraInfo topic; None: '<camera>/camera_info' or the only
        CameraInfo topic; '' for none
    :param sparse_depth_topic: sparse depth Image topic for metric scale, or None
    :param points_topic: LiDAR PointCloud2 topic for metric scale, or None
    :param params: ROS 2 params file (the node's parameters), or None
    :param model: model override (HF id, local folder or 'bundled:<name>'), or None
    :param copy_inputs: copy every input topic into the output bag as well
    :param no_points: do not write point clouds
    :param export: folder for per-frame PNG / PLY files, or None
    :param storage: output storage, 'mcap' or 'sqlite3'
    :param overwrite: replace an existing output (and export folder)
    :param batch: frames per estimator call; 0: the inference batch_size
    :param output_namespace: namespace of the output topics; None: the image topic's
    :param lookahead_s: seconds of recording read past a frame before it is processed
    :param strict: a frame that cannot be processed aborts the run (no output)
    :param quiet: no progress bar
    :param frames: (first, stop): process only the image frames of these indices (a window
        of the bag, see :mod:`marigold_ros.process_bags`; ``first`` a multiple of the batch),
        or None for all.  The rest of the recording is still read, so matching and batching
        are those of the whole run: the windows' outputs, one after the other, are the
        whole run's output (when no state carries over frames, see there).
    :param guidance: sparse guidance (Marigold-DC) for the frames with sparse depth / LiDAR
        points (``scale_recovery.guidance``; also on when the params file sets it)
    :param guidance_settings: ((GuidanceConfig field, value), ...) over the params file's
        ``guidance.*``
    """

    input: str  # noqa: A003 - the command-line name
    output: str
    image_topic: str = None
    camera_info_topic: str = None
    sparse_depth_topic: str = None
    points_topic: str = None
    params: str = None
    model: str = None
    copy_inputs: bool = False
    no_points: bool = False
    export: str = None
    storage: str = 'mcap'
    overwrite: bool = False
    batch: int = 0
    output_namespace: str = None
    lookahead_s: float = 1.0
    strict: bool = False
    quiet: bool = False
    frames: tuple = None
    guidance: bool = False
    guidance_settings: tuple = ()


@dataclass
class BagSummary:
    """
    What a run did.

    :param output: the output bag path
    :param image_topic: the processed image topic
    :param frames_in: image messages read
    :param frames_out: frames with outputs written
    :param errors: FrameError reason -> count (frames without outputs)
    :param problems: input problems that did not stop a frame (camera info, scale input)
    :param notes: pipeline notes (missing outputs) -> count
    :param topics_in: input topic -> messages read
    :param topics_out: output topic -> messages written
    :param seconds: wall time of the processing loop
    :param estimator_seconds: time spent in estimator calls
    :param scale_status: ScaleEstimate status -> frames ('relative' for no scale)
    :param scale_reasons: reason -> frames whose scale was stale or missing, by the reason the
        scale recovery gave (e.g. 'low_inlier_ratio', 'no_sparse_input')
    :param last_scale: the last usable ScaleEstimate, or None
    :param batch: frames per estimator call used
    :param extrinsic: where the LiDAR extrinsic came from ('' without LiDAR)
    :param camera_info_topic: the CameraInfo topic used ('' for none)
    """

    output: str = ''
    image_topic: str = ''
    frames_in: int = 0
    frames_out: int = 0
    errors: dict = field(default_factory=dict)
    problems: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    topics_in: dict = field(default_factory=dict)
    topics_out: dict = field(default_factory=dict)
    seconds: float = 0.0
    estimator_seconds: float = 0.0
    scale_status: dict = field(default_factory=dict)
    scale_reasons: dict = field(default_factory=dict)
    last_scale: object = None
    batch: int = 0
    extrinsic: str = ''
    camera_info_topic: str = ''


def _overlap(first, second):
    """Tell whether two paths are the same or one contains the other (links resolved)."""
    first, second = first.resolve(), second.resolve()
    return first == second or first in second.parents or second in first.parents


def check_output_paths(input_path, output_path, export_path=None):
    """
    Refuse outputs that could touch the input or each other.

    With --overwrite an existing output (or export) folder is replaced, so an output that
    contains the input would delete it; an export inside the output (or the other way
    round) would be moved away with it.

    :param input_path: the input bag
    :param output_path: the output bag folder
    :param export_path: the --export folder, or None
    :raises BagError: 'bad_output' naming the two paths
    """
    outputs = [('output', output_path)] + ([('export folder', export_path)]
                                           if export_path is not None else [])
    for what, path in outputs:
        if _overlap(path, input_path):
            raise BagError('bad_output', f'{what} {str(path)!r} must not be the input '
                                         f'{str(input_path)!r}, inside it or contain it: '
                                         'the input is never modified')
    if export_path is not None and _overlap(output_path, export_path):
        raise BagError('bad_output', f'export folder {str(export_path)!r} and output '
                                     f'{str(output_path)!r} must be separate folders')


# ---------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class RunConfig:
    """
    The configs of a run, built from the node's parameters exactly as the node builds them.

    :param estimator: EstimatorConfig (model max_input_pixels from the output settings)
    :param output: OutputConfig
    :param node: NodeConfig (camera info matching; the live-only fields are unused)
    :param scale: ScaleRecoveryConfig (source set from the scale topics)
    :param guidance: GuidanceConfig (used when ``scale.guidance``)
    """

    estimator: EstimatorConfig
    output: OutputConfig
    node: NodeConfig
    scale: ScaleRecoveryConfig
    guidance: GuidanceConfig = GuidanceConfig()


def build_run_config(job, topics, configs):
    """
    Combine the parameter configs with the command line.

    :param job: BagJob
    :param topics: Topics (sets the scale source)
    :param configs: from :func:`marigold_ros.node_params.read_node_params`
    :return: RunConfig
    """
    model, output = configs[ModelConfig], configs[OutputConfig]
    if job.model:
        model = override(model, model=job.model)
    if job.no_points:
        output = override(output, publish_points=False)
    source = 'sparse_depth' if topics.sparse_depth else 'points' if topics.points else 'none'
    scale = override(configs[ScaleRecoveryConfig], source=source,
                     queue_size=max(configs[ScaleRecoveryConfig].queue_size, OFFLINE_QUEUE),
                     guidance=job.guidance or configs[ScaleRecoveryConfig].guidance)
    guidance = override(configs[GuidanceConfig], **dict(job.guidance_settings))
    return RunConfig(estimator_config(model, configs[InferenceConfig], output), output,
                     configs[NodeConfig], scale, guidance)


# ---------------------------------------------------------------------------- summary


def format_summary(summary):
    """
    Describe a run for people: frames in / out per topic, time per frame, scale status.

    :param summary: BagSummary
    :return: multi-line str
    """
    lines = [f'output: {summary.output}',
             f'frames: {summary.frames_in} in on {summary.image_topic}, '
             f'{summary.frames_out} with depth, '
             f'{summary.frames_in - summary.frames_out} failed (batch {summary.batch})']
    per_frame = summary.seconds / summary.frames_in if summary.frames_in else math.nan
    model = summary.estimator_seconds / summary.frames_in if summary.frames_in else math.nan
    lines.append(f'time: {summary.seconds:.2f} s, {per_frame * 1e3:.1f} ms per frame '
                 f'({model * 1e3:.1f} ms in the estimator)')
    lines.append('topics in:')
    lines += [f'  {t}: {n}' for t, n in sorted(summary.topics_in.items())]
    lines.append('topics out:')
    lines += [f'  {t}: {n}' for t, n in sorted(summary.topics_out.items())]
    status = ', '.join(f'{k} {v}' for k, v in sorted(summary.scale_status.items()))
    lines.append(f'scale: {status or "none"}')
    if summary.scale_reasons:
        lines.append('  stale or missing because: ' + ', '.join(
            f'{k} {v}' for k, v in sorted(summary.scale_reasons.items())))
    if summary.extrinsic:
        lines.append(f'  LiDAR extrinsic: {summary.extrinsic}')
    if summary.last_scale is not None:
        scale = summary.last_scale
        lines.append(f'  last: scale {scale.scale:.6g}, shift {scale.shift:.6g} m '
                     f'({scale.status}{", " + scale.reason if scale.reason else ""})')
    tables = (('frame errors', summary.errors), ('input problems', summary.problems),
              ('notes', summary.notes))
    for title, table in tables:
        if table:
            lines.append(f'{title}: ' + ', '.join(f'{k} {v}' for k, v in sorted(
                table.items())))
    unmatched = summary.notes.get('no_camera_info', 0)
    if unmatched and summary.camera_info_topic:
        lines.append(f'hint: {summary.camera_info_topic} matched no camera info to {unmatched} '
                     'frames by stamp: raise camera_info_tolerance, or set '
                     'camera_info_use_latest: true for a static camera_info publisher '
                     '(--params)')
    elif unmatched:
        lines.append('hint: no CameraInfo topic was found or given (--camera-info-topic): '
                     'no clouds')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------- command line


def build_parser():
    """
    Return the command-line parser of ``process_bag``.

    :return: argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog='process_bag', description='Run Marigold depth on every image frame of a bag '
        '(rosbag2 sqlite3 / mcap or ROS 1) and write the node outputs to a new rosbag2.')
    parser.add_argument('input', help='input bag: rosbag2 folder, .db3 / .mcap file or .bag')
    parser.add_argument('output', help='output rosbag2 folder (must not exist)')
    add_job_options(parser)
    return parser


def add_job_options(parser, leave_out=()):
    """
    Add the options of a :class:`BagJob` (all but input and output) to a parser.

    ``process_bags`` takes the same options for each of its bags from here.

    :param parser: argparse.ArgumentParser
    :param leave_out: option destinations not to add (they keep the BagJob default)
    :return: the parser
    """
    defaults = {f.name: f.default for f in fields(BagJob) if f.default is not MISSING}
    parser = _Filtered(parser, set(leave_out))
    parser.add_argument('--image-topic', help='Image or CompressedImage topic (default: the '
                        'only image topic of the bag)')
    parser.add_argument('--camera-info-topic', help='CameraInfo topic (default: '
                        "'<camera>/camera_info' or the only CameraInfo topic; '' for none)")
    parser.add_argument('--sparse-depth-topic', help='sparse depth Image (16UC1 mm / 32FC1 m) '
                        'registered to the camera, for metric scale')
    parser.add_argument('--points-topic', help='LiDAR PointCloud2 for metric scale (extrinsic '
                        "from the bag's /tf and /tf_static, else the scale_recovery "
                        'parameters)')
    parser.add_argument('--params', help='ROS 2 params file with the node parameters, e.g. '
                        'config/depth.yaml')
    parser.add_argument('--model', help='model: HF id, local folder or bundled:<name> '
                        '(overrides the params file)')
    parser.add_argument('--copy-inputs', action='store_true',
                        help='copy every input topic into the output bag')
    parser.add_argument('--no-points', action='store_true', help='do not write point clouds')
    parser.add_argument('--export', metavar='DIR', help='also write per-frame 16-bit PNG '
                        'depth (mm when metric), colour previews and PLY clouds to DIR')
    parser.add_argument('--storage', choices=sorted(STORAGES),
                        help=f'output storage format (default {defaults["storage"]})')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing output bag / export folder')
    parser.add_argument('--batch', type=int, help='frames per estimator call '
                        '(default: the inference batch_size)')
    parser.add_argument('--output-namespace', help='namespace of the output topics (default: '
                        'that of the image topic)')
    parser.add_argument('--lookahead', type=float, dest='lookahead_s', metavar='SECONDS',
                        help='recording read past a frame before it is processed, so late '
                        'camera info / sparse depth still match (default '
                        f'{defaults["lookahead_s"]})')
    parser.add_argument('--strict', action='store_true',
                        help='stop without output when a frame cannot be processed')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    _add_guidance_options(parser)
    # Every default comes from BagJob (the options and the fields have the same names).
    parser.parser.set_defaults(**defaults)
    return parser.parser


def _add_guidance_options(parser):
    """Add --guidance and one --guidance-<field> per GuidanceConfig field (its defaults)."""
    parser.add_argument('--guidance', action='store_true',
                        help='sparse guidance (Marigold-DC): steer the diffusion towards the '
                        'sparse depth / LiDAR points of each frame instead of fitting a scale '
                        'afterwards (much slower; frames with too few points use the global '
                        'fit); the same as scale_recovery.guidance: true')
    defaults = GuidanceConfig()
    for item in fields(GuidanceConfig):
        default = getattr(defaults, item.name)
        parser.add_argument(f'--guidance-{item.name.replace("_", "-")}',
                            dest='guidance_settings', action=_Setting, const=item.name,
                            type=_parse_bool if isinstance(default, bool) else type(default),
                            metavar=type(default).__name__.upper(),
                            help=f'guidance.{item.name} (default: the params file, else '
                            f'{default})')


def _parse_bool(text):
    """Read true / false (1 / 0, yes / no) for a boolean option."""
    value = text.strip().lower()
    if value in ('true', '1', 'yes', 'on'):
        return True
    if value in ('false', '0', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


class _Setting(argparse.Action):
    """Collect (field, value) pairs of several options in one destination, in order."""

    def __call__(self, parser, namespace, values, option_string=None):
        """Append (field, value) to the destination's tuple."""
        setattr(namespace, self.dest,
                tuple(getattr(namespace, self.dest, None) or ()) + ((self.const, values),))


class _Filtered:
    """A parser that ignores the options whose destination is left out."""

    def __init__(self, parser, leave_out):
        self.parser, self.leave_out = parser, leave_out

    def add_argument(self, *names, **kwargs):
        dest = kwargs.get('dest') or names[0].lstrip('-').replace('-', '_')
        if dest not in self.leave_out:
            self.parser.add_argument(*names, **kwargs)


def job_from_args(args):
    """Turn the parsed arguments of :func:`build_parser` into a BagJob."""
    return BagJob(**{f.name: getattr(args, f.name) for f in fields(BagJob)})
