"""
Two helpers that move work to a background thread without changing its order.

:func:`prefetch` iterates ahead on its own thread (e.g. reading and deserializing a bag);
:class:`OrderedWorker` runs calls one after another on its own thread (e.g. writing a bag,
whose writer sqlite3 lets only one thread use). process_bag runs its reader and writer on
these, so every output byte is the same as a sequential run's.
"""

import queue
import threading


def prefetch(iterable, depth=32, name='process_bag_reader'):
    """
    Iterate on a background thread, up to ``depth`` items ahead; yield the items in order.

    A failure of the iteration is re-raised here, at the item where it happened; closing
    the generator stops the thread.
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

    thread = threading.Thread(target=produce, name=name, daemon=True)
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

    def __init__(self, depth=64, name='process_bag_writer'):
        """Start the thread named ``name``; ``depth`` bounds the queued calls."""
        self._queue = queue.Queue(maxsize=depth)
        self._error = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
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
        """Queue ``function(*args)``; re-raise an earlier failure."""
        if self._error is not None:
            raise self._error
        self._queue.put((function, args, None))

    def call(self, function, *args, check=True):
        """
        Run ``function(*args)`` after everything queued and return its result.

        :param check: re-raise a failure (earlier or of this call); False: return None instead
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
