"""
Overlap reading, the model and writing when processing a bag, without changing any order.

A bag is processed as a chain: read and deserialize -> decode and run the model -> make the
outputs (pipeline) -> serialize and write.  Run one after another, only the model step
uses the machine well; here each step gets its own thread, and each thread handles its
items strictly in bag order, so the result (every output byte) is the same as the
sequential chain's:

* :func:`prefetch` reads and deserializes ahead (a bounded queue);
* :class:`ModelAhead` runs the model on batch k+1 while the pipeline makes the outputs of
  batch k (the pipeline still processes one batch at a time, in order, and its estimator
  call receives exactly what a direct call would return);
* :class:`OrderedWorker` serializes and writes behind (a bounded queue; the bag writer is
  only ever used from its thread, as sqlite3 requires).

On a GPU, or with a free CPU core, this hides nearly everything but the model; on a fully
busy CPU the threads only share the cores.
"""

import collections
from concurrent.futures import ThreadPoolExecutor
import queue
import threading
import time

import numpy as np

from .bag_io import BagError, to_rclpy
from .pipeline import FrameError


class ModelAhead:
    """
    The estimator as the pipeline sees it, running each batch ahead on its own thread.

    :meth:`start` decodes a batch with the pipeline's own :meth:`DepthPipeline.decode` and
    runs the model on it in the background; when ``DepthPipeline.process`` then calls
    :meth:`estimate` for that batch, the result computed ahead is handed over (after checking
    that the frames and keys are the same), else the model runs on the spot.  The model is
    called once per batch, in batch order, from one thread, so results are exactly those of
    sequential calls.

    :param estimator: the DepthEstimator
    """

    def __init__(self, estimator):
        """Start the model thread; ``pipeline`` must be set before :meth:`start`."""
        self.estimator = estimator
        self.pipeline = None
        self.seconds = 0.0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix='process_bag_model')
        self._ahead = collections.deque()

    def start(self, frames):
        """
        Begin the model call of a batch.

        :param frames: list of FrameInput (image and key are used; ``rgb`` is set to the
            decoded image of each good frame, see :meth:`wait_decoded`)
        """
        self._ahead.append(self._pool.submit(self._run, frames))

    def wait_decoded(self):
        """Wait until the oldest batch started is decoded (its frames' ``rgb`` are set)."""
        if self._ahead:
            self._ahead[0].result()

    def _run(self, frames):
        rgbs, keys = [], []
        for frame in frames:
            try:
                frame.rgb = self.pipeline.decode(frame)
            except FrameError:
                continue  # the pipeline decodes it again, fails the same way, leaves it out
            rgbs.append(frame.rgb)
            keys.append(frame.key)
        if not rgbs:
            return rgbs, keys, None, None
        clock = time.perf_counter()
        try:
            results = self.estimator.estimate(rgbs, keys=keys)
        except Exception as error:  # noqa: B902 - handed to the pipeline, which sorts it
            return rgbs, keys, None, error
        finally:
            self.seconds += time.perf_counter() - clock
        return rgbs, keys, results, None

    def estimate(self, frames, keys=None):
        """
        Return the depth of the frames (the call DepthPipeline.process makes).

        :param frames: decoded RGB frames
        :param keys: stream keys
        :return: list of DepthResult
        """
        keys = list(keys) if keys is not None else [None] * len(frames)
        while self._ahead:
            rgbs, ahead_keys, results, error = self._ahead.popleft().result()
            if ahead_keys == keys and len(rgbs) == len(frames) and all(
                    a is b or np.array_equal(a, b) for a, b in zip(rgbs, frames)):
                if error is not None:
                    raise error
                return results
        clock = time.perf_counter()
        try:
            return self.estimator.estimate(frames, keys=keys)
        finally:
            self.seconds += time.perf_counter() - clock

    def close(self):
        """Drop the batches not started and wait for the one running."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def deserialized(messages, topics):
    """
    Pair each BagMessage with its rclpy message (None for topics that are only copied).

    A message that does not deserialize is paired with its BagError instead, so that one
    damaged message costs its frame, not the run.

    :param messages: iterable of BagMessage
    :param topics: names of the topics to deserialize
    :return: generator of (BagMessage, rclpy message or BagError or None)
    """
    for message in messages:
        if message.topic not in topics:
            yield message, None
            continue
        try:
            yield message, to_rclpy(message)
        except BagError as error:
            yield message, error


def prefetch(iterable, depth=32):
    """
    Iterate on a background thread, up to ``depth`` items ahead.

    A failure of the iteration is re-raised here, at the item where it happened; closing
    the generator stops the thread.

    :param iterable: any iterable
    :param depth: items read ahead
    :return: generator of the items, in order
    """
    items = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterable:
                if not put((True, item)):
                    return
        except BaseException as error:  # noqa: B902 - handed to the consuming thread
            put((False, error))
            return
        put((False, None))

    thread = threading.Thread(target=produce, name='process_bag_reader', daemon=True)
    thread.start()
    try:
        while True:
            ok, value = items.get()
            if not ok:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        thread.join()


class OrderedWorker:
    """
    Run calls one after another on one background thread, in submission order.

    :meth:`submit` queues a call; :meth:`call` queues one and waits for its result.  A
    failure is re-raised in the submitting thread by the next submit / call, and the calls
    queued after it are skipped.  The queue is bounded, so a slow disk holds the reader back
    instead of filling memory.
    """

    def __init__(self, depth=64):
        """Start the thread; ``depth`` bounds the queued calls."""
        self._queue = queue.Queue(maxsize=depth)
        self._error = None
        self._thread = threading.Thread(target=self._loop, name='process_bag_writer',
                                        daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            function, args, box = item
            if box is None and self._error is not None:
                continue  # skipped after a failure
            try:
                result = function(*args)
            except BaseException as error:  # noqa: B902 - handed to the submitting thread
                if box is None:
                    self._error = error
                else:
                    box.append((False, error))
            else:
                if box is not None:
                    box.append((True, result))
            finally:
                if box is not None:
                    box.done.set()

    def submit(self, function, *args):
        """
        Queue ``function(*args)``; re-raise an earlier failure.

        :param function: callable
        :param args: its arguments
        """
        if self._error is not None:
            raise self._error
        self._queue.put((function, args, None))

    def call(self, function, *args, check=True):
        """
        Run ``function(*args)`` after everything queued and return its result.

        :param function: callable
        :param args: its arguments
        :param check: re-raise a failure (earlier or of this call); False: return None
        :return: the result
        """
        if check and self._error is not None:
            raise self._error
        box = _Box()
        self._queue.put((function, args, box))
        box.done.wait()
        ok, value = box[0]
        if not ok:
            if check:
                raise value
            return None
        if check and self._error is not None:
            raise self._error
        return value

    def discard(self):
        """Drop the calls not started yet (after an error or an interrupt)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def close(self):
        """Stop the thread after the queued calls."""
        self._queue.put(None)
        self._thread.join()


class _Box(list):
    """Result slot of a synchronous call."""

    def __init__(self):
        super().__init__()
        self.done = threading.Event()
