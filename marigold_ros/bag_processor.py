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

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
import contextlib
import math
from pathlib import Path
import signal
import sys
import threading
import time

from marigold_model.scale_tracking import STATUS_STALE
from std_msgs.msg import Header

from . import export
from .bag_io import BagError, BagReader, deserialized, STORAGES
from .bag_job import BagSummary, build_parser, build_run_config, check_output_paths
from .bag_job import format_summary, job_from_args, OFFLINE_QUEUE
from .bag_tf import TF_TOPIC, TransformBuffer
from .bag_topics import output_topic_names, resolve_topics
from .bag_writer import AtomicBagWriter
from .gil import quick_gil_handover
from .heap import keep_large_buffers_in_heap
from .node_params import NodeConfig, OUTPUT_TOPICS, read_node_params
from .ordered_threads import OrderedWorker, prefetch
from .pipeline import DepthPipeline, FrameError, FrameInput
from .scale_inputs import REASON_NO_TRANSFORM, ScaleInputError, Tf2TransformLookup
from .scale_recovery import IDENTITY_EXTRINSIC, ScaleRecovery, ScaleRecoveryConfig
from .stamp_matcher import CameraInfoMatcher, NS_PER_S, stamp_to_ns
from .static_tf import StaticTransforms, TF_STATIC_TOPIC

# An image outside the window of a run (BagJob.frames): read, neither decoded nor inferred.
_OUTSIDE = object()


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT / SIGTERM; no output was left behind."""


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
        # Sparse guidance needs each frame's points before inference (guided_depth).
        self.guided = self.scale is not None and config.scale.guidance
        self.pipeline = DepthPipeline(processor.estimator, config.output, self.scale,
                                      config.guidance if self.guided else None)
        self.model = ThreadPoolExecutor(max_workers=1, thread_name_prefix='process_bag_model')
        self.model_seconds = 0.0  # written by the model thread only
        self.camera_infos = CameraInfoMatcher(config.node.camera_info_tolerance,
                                              OFFLINE_QUEUE, config.node.camera_info_use_latest)
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
            if self.guided:
                self._match_camera_infos(batch, frames)  # LiDAR points are projected
            now = (batch, frames, self.model.submit(self._decode_and_infer, frames))
        if started is not None:
            self._finish(*started)
        if self.guided and now is not None:
            # The model thread reads the sparse input of this batch: no more is added until
            # it is done, so the points do not depend on timing (bit-identical runs).
            wait_futures([now[2]])
        return now

    def _match_camera_infos(self, batch, frames):
        """Match each frame's camera info with everything read up to now."""
        if self.topics.camera_info:
            for (_, _, fallback), frame in zip(batch, frames):
                if not isinstance(frame.image, BagError):
                    frame.camera_info = self.camera_infos.match(
                        stamp_to_ns(frame.image.header.stamp), fallback)

    def _decode_and_infer(self, frames):
        """Decode a batch, then make its one estimator call (on the model thread)."""
        self.model_seconds += self.pipeline.infer(self.pipeline.decode(frames))

    def _finish(self, batch, frames, model):
        """Match camera info (everything read up to now), finish, queue the writes."""
        model.result()  # re-raises an unexpected estimator failure
        if not self.guided:  # guided runs matched them before inference
            self._match_camera_infos(batch, frames)
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
                if result.scale.status == STATUS_STALE:
                    _count(summary.scale_reasons, result.scale.reason)
            elif result.scale_reason:
                _count(summary.scale_reasons, result.scale_reason)
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
    Process a bag (a :class:`~marigold_ros.bag_job.BagJob`); the output appears only whole.

    ``estimator``: a loaded DepthEstimator to reuse; ``progress``: callable(frames done)
    replacing the progress bar.  Returns a BagSummary.
    """
    with quick_gil_handover():
        return BagProcessor(job, estimator, progress).run()


# ---------------------------------------------------------------------------- command line


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
