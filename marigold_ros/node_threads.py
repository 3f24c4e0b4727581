"""
The depth node's model thread and finisher thread, and the ordered hand-off between them.

The model thread takes the newest frame of every camera and infers them in one call; the
finisher thread builds and publishes each batch's outputs while the next one is inferred.
"""

import collections
import math
import threading
import time
import traceback

from .node_params import OUTPUT_NAMES
from .pipeline import FrameError, FrameInput, WARNING_PROBLEMS
from .stamp_matcher import NS_PER_S, stamp_to_ns


class Handoff:
    """
    The inferred batches on their way from the model thread to the finisher thread, in order.

    At most two batches are past the model and not yet published (one being finished, one
    waiting): :meth:`wait_room` holds the model thread before it takes new frames while two
    are, so the frames it takes are the newest ones and a frame never waits behind more
    than one batch, while the model infers batch k+1 as the finisher publishes batch k.
    The model thread never waits for the finisher thread to be scheduled.  Every wait ends
    when the pair's stop event is set (checked every 0.1 s).
    """

    #: Batches past the model and not yet published, at most.
    MAX_IN_FLIGHT = 2

    def __init__(self):
        """Start empty."""
        self._changed = threading.Condition()
        self._jobs = collections.deque()
        self._in_flight = 0  # batches put and not yet done (waiting or being finished)

    def put(self, job):
        """Hand a batch on (model thread)."""
        with self._changed:
            self._jobs.append(job)
            self._in_flight += 1
            self._changed.notify_all()

    def take(self, stop):
        """
        Wait for the oldest batch and take it out (finisher thread; then call :meth:`done`).

        :param stop: threading.Event ending the wait
        :return: the batch, or None when stopped or after 0.1 s without one
        """
        with self._changed:
            if not self._jobs and not stop.is_set():
                self._changed.wait(0.1)
            if stop.is_set() or not self._jobs:
                return None
            return self._jobs.popleft()

    def done(self):
        """Count the batch taken last as published (finisher thread)."""
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def wait_room(self, stop):
        """
        Wait until at most one batch is past the model and not yet published.

        :param stop: threading.Event ending the wait
        :return: True when there is room (False: stopped, or still full after 0.1 s)
        """
        with self._changed:
            if self._in_flight >= self.MAX_IN_FLIGHT and not stop.is_set():
                self._changed.wait(0.1)
            return self._in_flight < self.MAX_IN_FLIGHT and not stop.is_set()


class NodeThreads:
    """
    Start, run and stop the model and finisher threads; mixed into the depth node's core.

    The state they share with the callbacks (slots, locks, events, publishers, configs)
    lives on the node, created by its ``_core_init``.
    """

    def _start_worker(self):
        if self._worker is not None and self._worker.is_alive():
            return
        self._stop.clear()
        # Each pair of threads has its own stop event and hand-off: a pair left behind by
        # _stop_worker (a model call longer than shutdown_timeout) is not revived by
        # clearing the node's _stop, so two workers never take frames at the same time.
        self._worker_stop = threading.Event()
        handoff = Handoff()
        self._worker = threading.Thread(target=self._worker_loop,
                                        args=(self._worker_stop, handoff),
                                        name='marigold_worker', daemon=True)
        self._finisher = threading.Thread(target=self._finisher_loop,
                                          args=(self._worker_stop, handoff),
                                          name='marigold_finisher', daemon=True)
        self._finisher.start()
        self._worker.start()

    def _stop_worker(self):
        """Stop and join both threads (a model call in progress is finished first)."""
        self._stop.set()
        self._worker_stop.set()
        self._wake.set()
        timeout = self._node_config.shutdown_timeout
        deadline = time.monotonic() + timeout
        for thread in (self._worker, self._finisher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    self.get_logger().warning(
                        f'{thread.name} still busy after {timeout} s; leaving it behind')
        self._worker = None
        self._finisher = None
        with self._slot_lock:
            self._slots.clear()

    def _worker_loop(self, stop, handoff):
        """
        Take the newest frames, decode and infer them, hand them on (the model thread).

        It takes new frames only while at most one batch is past the model and not yet
        published (see Handoff), so the frames it takes are the newest ones and the model
        runs while the finisher publishes the previous batch.
        """
        while not stop.is_set():
            if not handoff.wait_room(stop) or not self._wake.wait(0.1):
                continue
            pipeline = self._pipeline
            if pipeline is None:
                # Model not loaded (yet): images wait in their slots, newer ones replace them.
                stop.wait(0.02)
                continue
            self._wake.clear()
            with self._slot_lock:
                batch, self._slots = self._slots, {}
            if not batch:
                continue
            try:
                job = self._infer(pipeline, batch)
            except Exception:  # noqa: B902 - the worker must survive anything
                if stop.is_set():
                    break
                self._report('', 'processing_error', traceback.format_exc())
                continue
            if not stop.is_set():
                handoff.put(job)

    def _finisher_loop(self, stop, handoff):
        """Finish each inferred batch (scale, messages) and publish it (the finisher thread)."""
        while not stop.is_set():
            job = handoff.take(stop)
            if job is None:
                continue
            try:
                self._finish(stop, *job)
            except Exception:  # noqa: B902 - the finisher must survive anything
                if stop.is_set():
                    break
                self._report('', 'processing_error', traceback.format_exc())
            finally:
                handoff.done()

    def _apply_inference(self, estimator):
        """Hand changed per-call settings to the model between calls, never during one."""
        inference = self._inference
        if inference is not self._applied_inference:
            estimator.set_inference(inference)
            self._applied_inference = inference

    def _infer(self, pipeline, batch):
        """
        Decode and infer one batch (camera -> (image, receive time in ns)), model thread.

        :return: (pipeline, batch, FrameInputs, time the batch was taken in ns, time the
            model call ended (perf_counter))
        """
        self._apply_inference(pipeline.estimator)
        started = self.get_clock().now().nanoseconds
        frames = [FrameInput(msg, None, camera) for camera, (msg, _) in batch.items()]
        if pipeline.guidance is not None and self._scale_source.points_need_camera:
            # Guidance projects LiDAR points before inference: match camera_info now.
            for frame in frames:
                frame.camera_info = self._camera_info_for(frame.key, frame.image)
        pipeline.infer(pipeline.decode(frames))
        return pipeline, batch, frames, started, time.perf_counter()

    def _finish(self, stop, pipeline, batch, frames, started, inferred):
        """
        Match camera_info, build the outputs of an inferred batch and publish them.

        One frame at a time: each camera's outputs go out as soon as they are built, not
        after those of every camera in the batch.  ``stop`` is the thread pair's own event:
        a pair left behind by a deactivate never publishes after a reactivation.
        """
        for frame in frames:
            if stop.is_set():
                return
            # From the model's end to this frame's finish: the wait for the finisher (the
            # batch before, the frames before in this batch); then the camera_info match.
            # Not diagnostics stages; the benchmark reads them.
            clock = time.perf_counter()
            waited = clock - inferred
            if frame.error is None and frame.camera_info is None:
                frame.camera_info = self._camera_info_for(frame.key, frame.image)
                frame.outputs = self._wanted_outputs(frame.key)
            matched = time.perf_counter() - clock
            (result,) = pipeline.finish([frame])
            if stop.is_set():
                return
            if isinstance(result, FrameError):
                self._report(frame.key, result.reason, str(result))
                continue
            for reason, message in result.problems:
                self._report(frame.key, reason, message, warning=reason in WARNING_PROBLEMS)
            received = batch[frame.key][1]
            result.timings.update(
                transport=(received - stamp_to_ns(result.header.stamp)) / NS_PER_S,
                queue=(started - received) / NS_PER_S, handoff=waited, match=matched)
            self._publish(result)

    def _wanted_outputs(self, camera):
        """Names of the outputs of a camera worth building now (None: the default ones)."""
        publishers = self._outputs.get(camera)
        if publishers is None:
            return None
        if not self._node_config.lazy_outputs:
            return frozenset(publishers)
        return frozenset(name for name, publisher in publishers.items()
                         if publisher.get_subscription_count() > 0)

    def _publish(self, output):
        publishers = self._outputs.get(output.key)
        if publishers is None:
            return  # deactivated meanwhile (lifecycle)
        clock = time.perf_counter()
        try:
            for name in OUTPUT_NAMES:
                message = getattr(output, name)
                if message is not None:
                    publishers[name].publish(message)
        except Exception:  # noqa: B902 - a shutdown can invalidate publishers mid-way
            if self._stop.is_set() or not self.context.ok():
                return
            raise
        output.timings['publish'] = time.perf_counter() - clock
        latency = (self.get_clock().now().nanoseconds - stamp_to_ns(output.header.stamp)) \
            / NS_PER_S
        self._diag.frame_published(output.key, latency,
                                   output.timings.get('estimator', math.nan), output.notes,
                                   output.scale, stages=output.timings)
        if self._output.fixed_scale <= 0:
            self._diag.set_extra(output.key, self._scale_source.diagnostic_fields(output.key))
