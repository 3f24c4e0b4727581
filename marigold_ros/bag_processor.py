"""
Offline bag processing: every image frame of a recorded bag in, a new bag with depth out.

``process_bag INPUT OUTPUT [options]`` (also ``ros2 run marigold_ros process_bag``) reads a
rosbag2 (sqlite3 or mcap) or ROS 1 bag with ``rosbags`` and writes a rosbag2 bag (mcap by
default) holding the live node's outputs for every frame, made by the same
:class:`~marigold_ros.pipeline.DepthPipeline` the node runs, stamped with the input headers.

How it differs from playing the bag into the node, and why:

* Nothing is dropped: frames are read in recording order and processed in fixed batches of
  consecutive frames, so the batch composition (and with it every output byte) is the same
  on every run.  The estimator seeds each frame, and output messages are serialized with
  zeroed CDR padding (see :func:`marigold_ros.bag_io.serialize_canonical`), so the same
  input, parameters and seed give a bit-identical output bag.
* Camera info, sparse depth and LiDAR are matched by stamp with the node's rules
  (nearest stamp within the tolerance), after reading ``--lookahead`` seconds of recording
  past the frame, so messages recorded slightly after their image still match.
* Output messages are logged at the bag time of their input image, so the output plays back
  in step with the input (copied through with ``--copy-inputs``).
* The output is written to a hidden sibling folder and moved into place only when complete;
  an error or Ctrl-C removes it, and the input is only ever opened read-only.
* Reading, the model and writing overlap: the reader and the writer threads
  (:mod:`marigold_ros.ordered_threads`) and a model thread that decodes and infers the
  next batch while this one finishes the current batch (the stages of
  :mod:`marigold_ros.pipeline`), each keeping bag order, so the model sets the pace
  wherever a core (or a GPU) is free.

Bit-identical means: every message (topic, bag time, bytes) and the storage files, for the
same input, parameters (``--batch`` included), seed, software and machine.  Exit status:
0 done (frames that could not be decoded are reported and skipped unless ``--strict``),
1 error (nothing written), 130 interrupted (nothing written).
"""

import argparse
from concurrent.futures import ThreadPoolExecutor
import contextlib
from dataclasses import dataclass, field, fields, MISSING
import math
from pathlib import Path
import signal
import sys
import threading
import time

from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig, override
from std_msgs.msg import Header

from . import export
from .bag_io import BagError, BagReader, deserialized, STORAGES
from .bag_tf import TF_TOPIC, TransformBuffer
from .bag_topics import output_topic_names, resolve_topics
from .bag_writer import AtomicBagWriter
from .heap import keep_large_buffers_in_heap
from .node_params import estimator_config, NodeConfig, OUTPUT_TOPICS, OutputConfig
from .node_params import read_node_params
from .ordered_threads import OrderedWorker, prefetch
from .pipeline import DepthPipeline, FrameError, FrameInput
from .scale_inputs import REASON_NO_TRANSFORM, ScaleInputError, Tf2TransformLookup
from .scale_recovery import IDENTITY_EXTRINSIC, ScaleRecovery, ScaleRecoveryConfig
from .stamp_matcher import CameraInfoMatcher, NS_PER_S, stamp_to_ns
from .static_tf import StaticTransforms, TF_STATIC_TOPIC

# An image outside the window of a run (BagJob.frames): read, neither decoded nor inferred.
_OUTSIDE = object()

# Camera info is matched like the node does; a bag has every message, so the buffers only
# need to hold what the look-ahead window can bring in, and are made large for that.
_OFFLINE_QUEUE = 1024


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
    last_scale: object = None
    batch: int = 0
    extrinsic: str = ''
    camera_info_topic: str = ''


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT / SIGTERM; no output was left behind."""


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
    """

    estimator: EstimatorConfig
    output: OutputConfig
    node: NodeConfig
    scale: ScaleRecoveryConfig


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
                     queue_size=max(configs[ScaleRecoveryConfig].queue_size, _OFFLINE_QUEUE))
    return RunConfig(estimator_config(model, configs[InferenceConfig], output), output,
                     configs[NodeConfig], scale)


# ---------------------------------------------------------------------------- processing


class _Progress:
    """A tqdm bar (frames, rate, ETA) or nothing."""

    def __init__(self, total, enabled):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit='frame', dynamic_ncols=True, file=sys.stderr,
                            desc='process_bag')

    def update(self, count):
        if self.bar is not None:
            self.bar.update(count)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class BagProcessor:
    """
    Feed a bag through the pipeline and write the outputs (one run).

    :param job: BagJob
    :param estimator: an already loaded DepthEstimator (tests, benchmarks) or None to load
        the configured model
    :param progress: callable(frames done) instead of the progress bar, or None
    """

    def __init__(self, job, estimator=None, progress=None):
        """Keep the job; nothing is opened before :meth:`run`."""
        if job.storage not in STORAGES:
            raise ValueError(f'unknown storage {job.storage!r}; use one of {sorted(STORAGES)}')
        if job.batch < 0:
            raise ValueError(f'batch must be >= 0 (0 = the inference batch_size), got '
                             f'{job.batch}')
        if not job.lookahead_s >= 0:
            raise ValueError(f'lookahead must be >= 0 s, got {job.lookahead_s}')
        if job.frames is not None and not 0 <= job.frames[0] <= job.frames[1]:
            raise ValueError(f'frames must be (first, stop) with 0 <= first <= stop, got '
                             f'{job.frames}')
        self.job = job
        self.estimator = estimator
        self.progress = progress
        self.summary = BagSummary()
        self.tf_buffer = None  # the bag's /tf, when the LiDAR extrinsic is looked up in it

    def run(self):
        """
        Process the bag; the output appears only when complete.

        :return: BagSummary
        :raises BagError: unreadable / damaged bag, missing topic, existing output
        :raises ValueError: bad parameters
        :raises KeyboardInterrupt: interrupted (no output left behind)
        """
        job = self.job
        input_path = Path(job.input).expanduser().absolute()
        output_path = Path(job.output).expanduser().absolute()
        check_output_paths(input_path, output_path,
                           Path(job.export).expanduser().absolute() if job.export else None)
        # Parameters first: a typo fails before the bag is read or the model loaded.
        configs = read_node_params(job.params)
        if configs[NodeConfig].keep_buffers_in_heap:
            keep_large_buffers_in_heap()  # the same setting as the node's
        with BagReader(input_path) as reader:
            topics = resolve_topics(reader, job, configs[ScaleRecoveryConfig].source)
            config = build_run_config(job, topics, configs)
            writer = AtomicBagWriter(output_path, job.storage, job.overwrite)
            exporter = None
            # Serializing and writing run on one background thread (the writer is used from
            # that thread only), in submission order, so the output bytes do not depend on
            # timing, while the model works on the next batch.
            self._load_model(config)  # before anything is created: a failure leaves nothing
            background = OrderedWorker()
            try:
                if job.export:
                    exporter = export.FrameExporter(job.export, job.overwrite)
                background.call(writer.open)
                _Run(self, reader, topics, config, writer, exporter, background).process()
                # The bag is closed first (what can fail: a full disk), then both folders
                # are moved into place, so a failure leaves neither behind.  An interrupt
                # while they move would leave one without the other: it waits until both
                # are in place (a few renames).
                background.call(writer.finish)
                with deferred_interrupts() as received:
                    if exporter is not None:
                        background.call(exporter.commit)
                        exporter = None
                    self.summary.output = str(background.call(writer.commit))
                if received:
                    print('process_bag: interrupt received while the finished output was '
                          'moved into place: the output is complete', file=sys.stderr)
            finally:
                background.discard()
                background.call(writer.abort, check=False)
                background.close()
                if exporter is not None:
                    exporter.abort()
        return self.summary

    def _load_model(self, config):
        if self.estimator is None:
            from marigold_model.estimator import DepthEstimator
            self.estimator = DepthEstimator(config.estimator)
        else:
            self.estimator.set_inference(config.estimator.inference)

    def _transforms(self, reader, scale):
        """
        Return the LiDAR extrinsic lookup: the bag's tf when use_tf, else the parameters.

        With ``/tf`` in the bag, a :class:`~marigold_ros.bag_tf.TransformBuffer` holding
        ``/tf_static`` is kept in :attr:`tf_buffer` for the run to feed ``/tf`` into, in
        recording order, and looked up as the live node looks up tf2 (motion compensation
        with ``fixed_frame`` included); with ``/tf_static`` only, the static chain.
        """
        self.tf_buffer = None
        fallback = (tuple(scale.extrinsic_translation), tuple(scale.extrinsic_rotation_xyzw))
        if fallback == IDENTITY_EXTRINSIC:
            # The default means 'not calibrated': frames /tf_static does not connect give
            # no_transform, as without /tf_static, instead of an identity extrinsic.
            fallback = None
        moving = scale.use_tf and TF_TOPIC in reader.topics
        if scale.fixed_frame and not moving:
            print(f'process_bag: scale_recovery.fixed_frame {scale.fixed_frame!r} is not '
                  f'used offline: the bag has no {TF_TOPIC}; the LiDAR extrinsic comes from '
                  f'{TF_STATIC_TOPIC} or the parameters, without motion compensation',
                  file=sys.stderr)
        if not scale.use_tf or not ({TF_TOPIC, TF_STATIC_TOPIC} & set(reader.topics)):
            self.summary.extrinsic = 'parameters'
            return None
        statics = [reader.deserialize(m) for m in reader.messages([TF_STATIC_TOPIC])] \
            if TF_STATIC_TOPIC in reader.topics else []
        if moving:
            self.tf_buffer = TransformBuffer()
            for msg in statics:
                self.tf_buffer.add_message(msg, static=True)
            self.summary.extrinsic = (f'{TF_TOPIC} and {TF_STATIC_TOPIC}'
                                      + (f' through {scale.fixed_frame!r}'
                                         if scale.fixed_frame else '') + ', else the parameters')
            return _with_fallback(Tf2TransformLookup(self.tf_buffer,
                                                     scale.transform_tolerance_s,
                                                     scale.fixed_frame), fallback)
        transforms = StaticTransforms.from_messages(statics, fallback)
        self.summary.extrinsic = (f'{TF_STATIC_TOPIC} ({len(transforms.frames)} frames), '
                                  'else the parameters')
        return transforms


def _with_fallback(lookup, fallback):
    """Use ``fallback`` where ``lookup`` finds no connection (the offline static rule)."""
    if fallback is None:
        return lookup

    def call(target_frame, source_frame, stamp_ns, image_stamp_ns=None):
        try:
            return lookup(target_frame, source_frame, stamp_ns, image_stamp_ns)
        except ScaleInputError as error:
            if error.reason != REASON_NO_TRANSFORM:
                raise
            return fallback
    return call


class _Run:
    """
    The state of one run while the bag streams through the stages.

    Four threads, each keeping bag order: the reader (:func:`prefetch`: read and
    deserialize ahead), the model (decode and infer batch k+1), this one (match camera info
    and scale inputs, finish batch k) and the writer (:class:`OrderedWorker`: serialize and
    write behind).

    :param processor: the BagProcessor (job, estimator, summary)
    :param reader: BagReader
    :param topics: Topics
    :param config: RunConfig
    :param writer: AtomicBagWriter (used from the writer thread only)
    :param exporter: FrameExporter or None
    :param background: the writer thread (OrderedWorker)
    """

    def __init__(self, processor, reader, topics, config, writer, exporter, background):
        """Build the pipeline and the matchers of the run; declare copied topics."""
        job = self.job = processor.job
        self.processor = processor
        self.summary = processor.summary
        self.reader, self.topics = reader, topics
        self.writer, self.exporter, self.background = writer, exporter, background
        inference = config.estimator.inference
        batch = job.batch or inference.batch_size
        if inference.warm_start_strength > 0 and batch != 1:
            # Warm start chains each frame to the one before it, as in the live node; a
            # batch would start all its frames from the frame before the batch.
            print('process_bag: warm start is on: processing one frame per call',
                  file=sys.stderr)
            batch = 1
        self.batch = self.summary.batch = batch
        # A window starts on a batch boundary of the whole run (its batches are the whole
        # run's); frames outside it pass as skipped batches (no decoding, no model).
        self.first, self.stop = job.frames if job.frames is not None else (0, math.inf)
        if self.first % batch:
            raise ValueError(f'a window must start on a batch boundary: frame {self.first} '
                             f'is not a multiple of the batch {batch}')
        self.scale = None
        if topics.sparse_depth:
            self.scale = ScaleRecovery(config.scale)
        elif topics.points:
            self.scale = ScaleRecovery(config.scale,
                                       processor._transforms(reader, config.scale))
        self.pipeline = DepthPipeline(processor.estimator, config.output, self.scale)
        self.model = ThreadPoolExecutor(max_workers=1, thread_name_prefix='process_bag_model')
        self.model_seconds = 0.0  # written by the model thread only
        self.camera_infos = CameraInfoMatcher(config.node.camera_info_tolerance,
                                              _OFFLINE_QUEUE, config.node.camera_info_use_latest)
        self.outputs = output_topic_names(topics.namespace)
        self.index = self.first
        self.progress = self.bar = None
        if job.copy_inputs:
            clash = sorted(set(self.outputs.values()) & set(reader.topics))
            if clash:
                raise BagError('bad_output', f'output topics {clash} already exist in the '
                                             'input; with --copy-inputs choose another '
                                             '--output-namespace')
            if reader.mixed_type_topics:
                print(f'process_bag: not copied (recorded with several message types): '
                      f'{reader.mixed_type_topics}', file=sys.stderr)
            for name in sorted(reader.topics):
                info = reader.connection_info(name)
                background.call(writer.add_topic, name, info['msgtype'], info['msgdef'],
                                info['rihs01'], info['qos'])

    def process(self):
        """Read the bag, run every frame through the stages and queue the outputs."""
        job, topics, summary, reader = self.job, self.topics, self.summary, self.reader
        summary.image_topic = topics.image
        summary.camera_info_topic = topics.camera_info or ''
        used = [t for t in (topics.image, topics.camera_info, topics.sparse_depth,
                            topics.points) if t]
        tf_buffer = self.processor.tf_buffer
        decoded = set(used)
        if tf_buffer is not None:
            used.append(TF_TOPIC)  # fed in recording order, ahead of the frames (look-ahead)
        lookahead = int(round(job.lookahead_s * NS_PER_S))
        pending, started = [], None
        total = min(self.stop, reader.topics[topics.image].count) - self.first
        self.bar = None if self.processor.progress else _Progress(total, not job.quiet)
        self.progress = self.processor.progress or self.bar.update
        clock = time.perf_counter()
        # Reading and deserializing run ahead on their own thread, like the writing.
        stream = prefetch(self._decoded(reader.messages(None if job.copy_inputs else used),
                                        decoded))
        try:
            for message, msg in stream:
                summary.topics_in[message.topic] = summary.topics_in.get(message.topic, 0) + 1
                if job.copy_inputs:
                    self.background.submit(self.writer.write, message.topic,
                                           message.log_time, message.cdr)
                if isinstance(msg, BagError) and message.topic != topics.image:
                    self._bad_message(message, msg)
                elif message.topic == topics.image and msg is _OUTSIDE:
                    pending.append((message, msg, None))
                elif message.topic == topics.image:
                    # A BagError fails its frame, in order.  The newest camera info read so
                    # far is what the live node would fall back to (camera_info_use_latest):
                    # one recorded after the image must not be used.
                    pending.append((message, msg, self.camera_infos.fallback()))
                elif message.topic == topics.camera_info:
                    self.camera_infos.add_msg(msg)
                elif message.topic == TF_TOPIC and tf_buffer is not None:
                    self._add_tf(message, tf_buffer)
                elif message.topic in (topics.sparse_depth, topics.points):
                    self._add_scale_input(message, msg)
                # A batch goes once the recording has moved `lookahead` past its last frame.
                while len(pending) >= self.batch and \
                        message.log_time - pending[self.batch - 1][0].log_time > lookahead:
                    started = self._advance(started, pending[:self.batch])
                    del pending[:self.batch]
                if started is None and self.index >= self.stop:
                    pending.clear()  # a window's last batch is written: the rest is not read
                    break
            while pending:
                count = min(self.batch, len(pending))
                started = self._advance(started, pending[:count])
                del pending[:count]
            self._advance(started, None)
            self.background.call(lambda: None)  # wait for every write
        finally:
            stream.close()
            self.model.shutdown(wait=True, cancel_futures=True)
            if self.bar is not None:
                self.bar.close()
        summary.estimator_seconds = self.model_seconds
        summary.seconds = time.perf_counter() - clock
        summary.topics_out = {t: n for t, n in self.writer.counts.items()
                              if t in self.outputs.values()}
        if summary.frames_in == 0:
            raise BagError('no_topic', f'no message could be read from {topics.image!r} '
                                       f'although the bag lists '
                                       f'{reader.topics[topics.image].count}')

    def _decoded(self, messages, topics):
        """Deserialize (:func:`deserialized`), passing images outside the window as such."""
        index = 0
        for message in messages:
            if message.topic == self.topics.image:
                inside = self.first <= index < self.stop
                index += 1
                if not inside:
                    yield message, _OUTSIDE
                    continue
            yield from deserialized((message,), topics)

    def _add_tf(self, message, tf_buffer):
        """Add a /tf message to the buffer (rosbags: tf2_msgs may have no rclpy class)."""
        try:
            tf_buffer.add_message(self.reader.deserialize(message))
        except BagError as error:
            self._bad_message(message, error)

    def _add_scale_input(self, message, msg):
        try:
            if message.topic == self.topics.sparse_depth:
                self.scale.add_sparse_depth(self.topics.image, msg)
            else:
                self.scale.add_points(self.topics.image, msg)
        except ScaleInputError as error:
            # Counted by ScaleRecovery and matched to its frame, which then reports why.
            _count(self.summary.problems, error.reason)

    def _bad_message(self, message, error):
        """Report and skip a camera info / scale message that does not deserialize."""
        if self.job.strict:
            raise BagError('corrupt', f'{error} (--strict: no output written)')
        _count(self.summary.problems, f'corrupt_{message.topic}')
        print(f'process_bag: skipped a message: {error}', file=sys.stderr)

    def _advance(self, started, batch):
        """
        Start ``batch`` on the model thread, then finish the batch started before.

        The model thread decodes and infers ``batch`` while this thread finishes
        ``started``: batches still pass every stage one at a time and in order.

        :param started: the batch started before, from the previous call, or None
        :param batch: list of (message, image or BagError, camera info fallback), or None
        :return: the batch now started: (its entries, its frames, the model's future)
        """
        now = None
        if batch is not None and batch[0][1] is _OUTSIDE:
            batch = None  # outside the window: finishes the batch before it, as in a whole run
        if batch is not None:
            frames = [FrameInput(image=image, key=self.topics.image) for _, image, _ in batch]
            for frame in frames:
                if isinstance(frame.image, BagError):  # fails in order, without the model
                    frame.error = FrameError('corrupt', str(frame.image), frame.key)
            now = (batch, frames, self.model.submit(self._decode_and_infer, frames))
        if started is not None:
            self._finish(*started)
        return now

    def _decode_and_infer(self, frames):
        """Decode a batch, then make its one estimator call (on the model thread)."""
        self.model_seconds += self.pipeline.infer(self.pipeline.decode(frames))

    def _finish(self, batch, frames, model):
        """Match camera info (everything read up to now), finish, queue the writes."""
        model.result()  # re-raises an unexpected estimator failure
        if self.topics.camera_info:
            for (_, _, fallback), frame in zip(batch, frames):
                if not isinstance(frame.image, BagError):
                    frame.camera_info = self.camera_infos.match(
                        stamp_to_ns(frame.image.header.stamp), fallback)
        summary = self.summary
        done = []
        for (message, _, _), frame, result in zip(batch, frames, self.pipeline.finish(frames)):
            index = self.index
            self.index += 1
            summary.frames_in += 1
            if isinstance(result, FrameError):
                self._frame_error(index, message, frame, result)
                done.append((index, message.log_time, result, _header_of(frame)))
                continue
            summary.frames_out += 1
            for note in result.notes:
                _count(summary.notes, note)
            for reason, _ in result.problems:
                _count(summary.problems, reason)
            _count(summary.scale_status,
                   result.scale.status if result.scale is not None else 'relative')
            if result.scale is not None:
                summary.last_scale = result.scale
            done.append((index, message.log_time, result, None))
        self.background.submit(self._write_outputs, done)
        self.progress(len(batch))

    def _frame_error(self, index, message, frame, error):
        _count(self.summary.errors, error.reason)
        header = _header_of(frame)
        text = (f'frame {index} (stamp {stamp_to_ns(header.stamp)} ns, bag time '
                f'{message.log_time} ns) on {message.topic!r}: {error.reason}: {error}')
        if self.job.strict:
            raise BagError('corrupt', text + ' (--strict: no output written)')
        print(f'process_bag: skipped {text}', file=sys.stderr)

    def _write_outputs(self, done):
        """Write the outputs of a batch (on the writer thread)."""
        for index, log_time, result, header in done:
            if isinstance(result, FrameError):
                if self.exporter is not None:
                    self.exporter.error(index, log_time, header, result.reason)
                continue
            for output in OUTPUT_TOPICS:
                msg = getattr(result, output.name)
                if msg is None or (output.name == 'points' and self.job.no_points):
                    continue
                self.writer.write_msg(self.outputs[output.name], log_time, msg,
                                      output.msgtype)
            if self.exporter is not None:
                self.exporter.write(index, log_time, result)


def _count(table, key):
    table[key] = table.get(key, 0) + 1


def _header_of(frame):
    """Return the image header of a frame (empty when the message did not deserialize)."""
    return Header() if isinstance(frame.image, BagError) else frame.image.header


def process_bag(job, estimator=None, progress=None):
    """
    Process a bag (see :class:`BagJob`); the output appears only when complete.

    :param job: BagJob
    :param estimator: optional loaded DepthEstimator
    :param progress: optional callable(frames done) replacing the progress bar
    :return: BagSummary
    """
    return BagProcessor(job, estimator, progress).run()


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
    # Every default comes from BagJob (the options and the fields have the same names).
    parser.parser.set_defaults(**defaults)
    return parser.parser


class _Filtered:
    """A parser that ignores the options whose destination is left out."""

    def __init__(self, parser, leave_out):
        self.parser, self.leave_out = parser, leave_out

    def add_argument(self, *names, **kwargs):
        dest = kwargs.get('dest') or names[0].lstrip('-').replace('-', '_')
        if dest not in self.leave_out:
            self.parser.add_argument(*names, **kwargs)


def job_from_args(args):
    """
    Turn parsed arguments into a BagJob.

    :param args: argparse.Namespace from :func:`build_parser`
    :return: BagJob
    """
    return BagJob(**{f.name: getattr(args, f.name) for f in fields(BagJob)})


@contextlib.contextmanager
def deferred_interrupts():
    """
    Hold SIGINT and SIGTERM back while the block runs (from the main thread; else no-op).

    :return: context manager yielding the list of signals received meanwhile
    """
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(number, lambda number, frame: received.append(number))
                for number in signals]
    try:
        yield received
    finally:
        for number, handler in zip(signals, previous):
            signal.signal(number, handler)


def _raise_interrupt(signum, frame):
    raise Interrupted(f'signal {signum}')


def main(argv=None):
    """
    Command line entry point of ``process_bag``.

    :param argv: arguments (default sys.argv[1:]); ROS arguments are ignored
    :return: exit status: 0 done, 1 error (nothing written), 130 interrupted
    """
    if argv is None:
        argv = sys.argv[1:]
    if '--ros-args' in argv:  # `ros2 run` may append ROS arguments
        argv = argv[:argv.index('--ros-args')]
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = process_bag(job_from_args(args))
    except KeyboardInterrupt:
        print('process_bag: interrupted; no output written', file=sys.stderr)
        return 130
    except (BagError, ValueError, OSError) as error:
        # OSError: model weights not found (WeightsNotFoundError), disk full, permissions.
        print(f'process_bag: error: {error}\nno output written', file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_summary(summary))
    return 0


if __name__ == '__main__':
    sys.exit(main())
