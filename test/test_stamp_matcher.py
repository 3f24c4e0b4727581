"""Tier-1 tests of marigold_ros.stamp_matcher."""

import math
import threading

from builtin_interfaces.msg import Time
from marigold_ros.stamp_matcher import CameraInfoMatcher
from marigold_ros.stamp_matcher import ns_to_stamp
from marigold_ros.stamp_matcher import stamp_to_ns
from marigold_ros.stamp_matcher import StampMatcher
import pytest
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Header

MS = 1_000_000


def test_stamp_conversions():
    assert stamp_to_ns(Time(sec=3, nanosec=7)) == 3_000_000_007
    stamp = ns_to_stamp(1_700_000_000_123_456_789)
    assert (stamp.sec, stamp.nanosec) == (1_700_000_000, 123_456_789)
    assert stamp_to_ns(stamp) == 1_700_000_000_123_456_789
    with pytest.raises(ValueError):
        ns_to_stamp(-1)


def test_exact_and_closest_within_tolerance():
    matcher = StampMatcher(tolerance_s=0.005, max_queue=10)
    for i in range(5):
        matcher.add(i * 33 * MS, f'info{i}')
    assert matcher.match(66 * MS) == 'info2'
    assert matcher.match(66 * MS + 4 * MS) == 'info2'
    assert matcher.match(99 * MS - 3 * MS) == 'info3'
    assert matcher.match(50 * MS) is None  # 17 ms from both neighbours
    assert matcher.match(10_000 * MS) is None
    # Matching does not consume: the same message serves several images.
    assert matcher.match(66 * MS) == 'info2'


def test_tie_goes_to_earlier_stamp_and_replacement():
    matcher = StampMatcher(tolerance_s=0.1, max_queue=5)
    matcher.add(100 * MS, 'a')
    matcher.add(120 * MS, 'b')
    assert matcher.match(110 * MS) == 'a'
    matcher.add(100 * MS, 'a2')
    assert len(matcher) == 2
    assert matcher.match(100 * MS) == 'a2'


def test_bounded_memory_drops_earliest_received():
    matcher = StampMatcher(tolerance_s=0.0, max_queue=3)
    for i in range(6):
        matcher.add(i, i)
    assert len(matcher) == 3
    assert matcher.match(2) is None and matcher.match(3) == 3
    # A clock jump backwards (bag loop): old entries age out, the new ones are kept.
    for i in range(3):
        matcher.add(1000 - i, f'new{i}')
    assert matcher.match(5) is None
    assert matcher.match(999) == 'new1'


def test_latest_and_infinite_tolerance():
    matcher = StampMatcher(tolerance_s=math.inf, max_queue=4)
    assert matcher.latest() is None and matcher.match(0) is None
    matcher.add(500, 'late stamp, early arrival')
    matcher.add(10, 'early stamp, latest arrival')
    assert matcher.latest() == 'early stamp, latest arrival'
    assert matcher.match(10 ** 15) == 'late stamp, early arrival'
    assert matcher.tolerance_s == math.inf
    matcher.clear()
    assert len(matcher) == 0 and matcher.latest() is None


def test_add_msg_uses_header_stamp():
    matcher = StampMatcher(tolerance_s=0.0)
    info = CameraInfo(header=Header(stamp=Time(sec=4, nanosec=5)))
    matcher.add_msg(info)
    assert matcher.match(4_000_000_005) is info


@pytest.mark.parametrize('kwargs', [{'tolerance_s': -0.1}, {'tolerance_s': math.nan},
                                    {'max_queue': 0}])
def test_bad_settings_rejected(kwargs):
    with pytest.raises(ValueError):
        StampMatcher(**kwargs)


def test_concurrent_add_and_match():
    matcher = StampMatcher(tolerance_s=0.001, max_queue=8)
    errors = []

    def producer(offset):
        try:
            for i in range(2000):
                matcher.add(offset + i * MS, i)
        except Exception as exc:  # noqa: B902 - any failure fails the test below
            errors.append(exc)

    def consumer():
        try:
            for i in range(2000):
                found = matcher.match(i * MS)
                assert found is None or isinstance(found, int)
                matcher.latest()
        except Exception as exc:  # noqa: B902
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=consumer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60.0)  # a deadlock fails the test instead of hanging the run
    assert not any(thread.is_alive() for thread in threads)
    assert not errors
    assert len(matcher) == 8


def _stamp_only_info(ns):
    return CameraInfo(header=Header(frame_id='cam', stamp=ns_to_stamp(ns)))


def test_camera_info_matcher_falls_back_only_with_use_latest():
    """By stamp first; the newest (or the caller's) camera_info only with use_latest."""
    strict = CameraInfoMatcher(0.005, 10)
    latest = CameraInfoMatcher(0.005, 10, use_latest=True)
    for matcher in (strict, latest):
        assert matcher.fallback() is None and matcher.match(100 * MS) is None
        matcher.add_msg(_stamp_only_info(10 * MS))
        matcher.add_msg(_stamp_only_info(20 * MS))
        assert stamp_to_ns(matcher.match(11 * MS).header.stamp) == 10 * MS
    assert strict.match(100 * MS) is None and strict.fallback() is None
    assert stamp_to_ns(latest.match(100 * MS).header.stamp) == 20 * MS
    assert stamp_to_ns(latest.fallback().header.stamp) == 20 * MS
    # The bag processor passes what the live node could have used when the image arrived.
    early = _stamp_only_info(1 * MS)
    assert latest.match(100 * MS, fallback=early) is early
    assert latest.match(100 * MS, fallback=None) is None
    assert strict.match(100 * MS, fallback=early) is None


def test_camera_info_matcher_waits_only_for_one_that_may_follow():
    """Worth waiting: camera_info seen, older than the image, and no use_latest."""
    strict = CameraInfoMatcher(0.005, 10)
    assert not strict.may_follow(50 * MS)  # none seen yet: maybe no publisher at all
    strict.add_msg(_stamp_only_info(40 * MS))
    assert strict.may_follow(50 * MS)
    assert not strict.may_follow(30 * MS)  # newer than the image: it will not come
    latest = CameraInfoMatcher(0.005, 10, use_latest=True)
    latest.add_msg(_stamp_only_info(40 * MS))
    assert not latest.may_follow(50 * MS)
