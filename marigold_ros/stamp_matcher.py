"""
Match a secondary message stream (camera_info, sparse depth) to image stamps.

Also the home of stamp <-> nanosecond conversion and of the camera_info rule that the node
and the bag processor share (:class:`CameraInfoMatcher`).
"""

import math
import threading

from builtin_interfaces.msg import Time

#: Nanoseconds per second: the one time constant of the ROS side.
NS_PER_S = 1_000_000_000


def stamp_to_ns(stamp):
    """Return a builtin_interfaces/Time (anything with ``sec``, ``nanosec``) as int ns."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def ns_to_stamp(ns):
    """Return non-negative integer nanoseconds as a builtin_interfaces/Time (else ValueError)."""
    ns = int(ns)
    if ns < 0:
        raise ValueError(f'time must be >= 0 ns, got {ns}')
    return Time(sec=ns // NS_PER_S, nanosec=ns % NS_PER_S)


class StampMatcher:
    """
    Keep the recent messages of one stream and find the one closest to a stamp.

    Memory is bounded by ``max_queue``: when full, the message received earliest is dropped
    (receive order, not stamp order, so a clock jump backwards, e.g. a looping bag, ages the
    old messages out instead of pinning them).  A message with a stamp already stored
    replaces the stored one.  All methods are thread-safe: callbacks add, the worker matches.

    :param tolerance_s: largest accepted ``|stamp - image stamp|`` in seconds (>= 0;
        ``math.inf`` accepts any gap).
    :param max_queue: number of messages kept (>= 1).
    """

    def __init__(self, tolerance_s=0.01, max_queue=30):
        """Validate the settings and create an empty store."""
        tolerance_s = float(tolerance_s)
        if not tolerance_s >= 0:  # also rejects NaN
            raise ValueError(f'tolerance_s must be >= 0 (or inf), got {tolerance_s}')
        if int(max_queue) < 1:
            raise ValueError(f'max_queue must be >= 1, got {max_queue}')
        self._tolerance_ns = math.inf if math.isinf(tolerance_s) else \
            int(round(tolerance_s * NS_PER_S))
        self._max_queue = int(max_queue)
        # Insertion-ordered dict stamp -> message: O(1) eviction of the earliest received.
        self._items = {}
        self._lock = threading.Lock()

    @property
    def tolerance_s(self):
        """Return the tolerance in seconds."""
        return self._tolerance_ns if math.isinf(self._tolerance_ns) else \
            self._tolerance_ns / NS_PER_S

    @property
    def max_queue(self):
        """Return the capacity."""
        return self._max_queue

    def add(self, stamp_ns, msg):
        """Store a message (any object) under its stamp in integer nanoseconds."""
        stamp_ns = int(stamp_ns)
        with self._lock:
            self._items.pop(stamp_ns, None)
            self._items[stamp_ns] = msg
            while len(self._items) > self._max_queue:
                del self._items[next(iter(self._items))]

    def add_msg(self, msg):
        """Store a message under its ``header.stamp``."""
        self.add(stamp_to_ns(msg.header.stamp), msg)

    def match(self, stamp_ns):
        """
        Return the stored message closest to ``stamp_ns`` within the tolerance, or None.

        Ties go to the earlier stamp.  The message stays stored (one camera_info may serve
        several images).
        """
        stamp_ns = int(stamp_ns)
        with self._lock:
            best_key, best_gap = None, None
            for key in self._items:
                gap = abs(key - stamp_ns)
                if best_gap is None or gap < best_gap or (gap == best_gap and key < best_key):
                    best_key, best_gap = key, gap
            if best_key is None or best_gap > self._tolerance_ns:
                return None
            return self._items[best_key]

    def latest(self):
        """
        Return the most recently received message whatever its stamp, or None.

        Meant for streams whose stamps do not follow the images (static camera_info
        publishers, latched topics); combine with ``tolerance_s=math.inf``.
        """
        with self._lock:
            if not self._items:
                return None
            return self._items[next(reversed(self._items))]

    def clear(self):
        """Drop all stored messages (e.g. after a clock jump)."""
        with self._lock:
            self._items.clear()

    def __len__(self):
        """Return the number of stored messages."""
        with self._lock:
            return len(self._items)


#: ``CameraInfoMatcher.match``'s default fallback: the newest camera_info stored now.
LATEST = object()


class CameraInfoMatcher:
    """
    Find the camera_info of an image by stamp, with the ``use_latest`` fallback.

    The nearest stamp within the tolerance, else (with ``use_latest``) the newest
    camera_info whatever its stamp: one rule for the live node and the bag processor.  The
    bag processor passes the fallback it saw when the image was read, so that a camera_info
    recorded after the image is never used (the live node could not have used it).

    :param tolerance_s: largest stamp gap of a match, seconds
    :param max_queue: camera_info messages kept
    :param use_latest: fall back to the newest camera_info (static camera_info publishers)
    """

    def __init__(self, tolerance_s, max_queue, use_latest=False):
        """Create an empty store."""
        self._matcher = StampMatcher(tolerance_s, max_queue)
        self.use_latest = bool(use_latest)

    def add_msg(self, msg):
        """Store a sensor_msgs/CameraInfo under its header stamp."""
        self._matcher.add_msg(msg)

    def fallback(self):
        """Return what :meth:`match` would fall back to now (None without use_latest)."""
        return self._matcher.latest() if self.use_latest else None

    def match(self, stamp_ns, fallback=LATEST):
        """
        Return the camera_info of an image stamp (integer ns), or None.

        :param fallback: with use_latest, used when none matches by stamp (default: the
            newest one stored now)
        """
        info = self._matcher.match(stamp_ns)
        if info is None and self.use_latest:
            info = self._matcher.latest() if fallback is LATEST else fallback
        return info

    def may_follow(self, stamp_ns):
        """Tell whether a camera_info for this stamp (ns) may still arrive: worth a short wait."""
        # Only when camera_info has been seen and is older than the image; never with
        # use_latest: the newest one will do (a static publisher's would never match, and
        # waiting for it would lose the wait on every frame).
        latest = self._matcher.latest()
        return not self.use_latest and latest is not None and \
            stamp_to_ns(latest.header.stamp) < stamp_ns
