"""
What the node reports on /diagnostics: rates, latency percentiles, counters, model state.

:class:`DiagnosticsCollector` is fed from the subscription callbacks and the worker thread
(thread-safe) and turned into a diagnostic_msgs/DiagnosticArray once per period by
:meth:`DiagnosticsCollector.to_msg`: one status for the model and one per camera.
:class:`KeyedThrottle` limits log lines per problem (rclpy's ``throttle_duration_sec`` is
per call site, so one frequent problem would hide every other one logged from that line).
"""

from collections import Counter, deque
import math
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray
from diagnostic_msgs.msg import DiagnosticStatus
from diagnostic_msgs.msg import KeyValue
import numpy as np

#: Model states reported in the model status.
MODEL_UNCONFIGURED = 'unconfigured'
MODEL_LOADING = 'loading'
MODEL_READY = 'ready'
MODEL_ERROR = 'error'

# Notes of pipeline.py that mean a requested output is missing (a WARN in diagnostics).
_NOTE_TEXT = {
    'no_camera_info': 'no camera_info matched to the images: no depth/camera_info and no '
                      'point cloud (relative depth is published)',
    'bad_camera_info': 'camera_info unusable (see bad messages): no point cloud',
    'no_metric_scale': 'no metric scale (no fixed_scale, no scale recovery estimate): '
                       'relative depth only, no depth/image and no point cloud',
}


class RateMeter:
    """
    Events per second over a sliding time window.

    :param window_s: length of the window in seconds
    :param max_events: events kept (bounds memory at high rates)
    """

    def __init__(self, window_s=5.0, max_events=1000):
        """Create an empty meter."""
        self.window_s = float(window_s)
        self._times = deque(maxlen=int(max_events))

    def add(self, now=None):
        """Record one event at monotonic time ``now`` in seconds (default: now)."""
        self._times.append(time.monotonic() if now is None else now)

    def rate(self, now=None):
        """
        Return the event rate over the window.

        With fewer than two events in the window the rate is the count over the window;
        otherwise (count - 1) over the span from the first event in the window to now,
        which is exact for a steady stream that started within the window.

        :return: events per second (0.0 without events)
        """
        now = time.monotonic() if now is None else now
        start = now - self.window_s
        while self._times and self._times[0] < start:
            self._times.popleft()
        count = len(self._times)
        if count < 2:
            return count / self.window_s
        span = now - self._times[0]
        return (count - 1) / span if span > 0 else 0.0


class Percentiles:
    """
    Percentiles of the most recent values (a bounded window).

    :param size: number of recent values kept
    """

    def __init__(self, size=200):
        """Create an empty window."""
        self._values = deque(maxlen=int(size))

    def add(self, value):
        """Record a value (non-finite values are ignored)."""
        if math.isfinite(value):
            self._values.append(float(value))

    def __len__(self):
        """Return the number of values in the window."""
        return len(self._values)

    def values(self):
        """Return the values in the window, oldest first."""
        return list(self._values)

    def percentile(self, q):
        """Return the ``q`` in [0, 100] percentile, linearly interpolated (NaN when empty)."""
        if not self._values:
            return math.nan
        return float(np.percentile(np.fromiter(self._values, float), q))


class KeyedThrottle:
    """
    Allow one event per key per period; count the suppressed ones.

    :param period_s: seconds between two allowed events of the same key
    """

    def __init__(self, period_s=5.0):
        """Create the throttle."""
        self.period_s = float(period_s)
        self._last = {}
        self._suppressed = Counter()
        self._lock = threading.Lock()

    def allow(self, key, now=None):
        """
        Decide whether an event of ``key`` may be reported now.

        :param key: hashable key (e.g. (camera, reason))
        :return: (allowed, number of events of this key suppressed since the last allowed)
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._suppressed[key] += 1
                return False, 0
            self._last[key] = now
            return True, self._suppressed.pop(key, 0)

    def report(self, key, text, now=None):
        """
        Return the line to log for an event, or None while its key is throttled.

        :return: ``text``, with the count of events suppressed since the last report, or
            None
        """
        allowed, suppressed = self.allow(key, now)
        if not allowed:
            return None
        return f'{text} ({suppressed} more since the last report)' if suppressed else text


#: Largest |stamp-to-publish latency| recorded, seconds: beyond it the image stamp and the
#: node's clock disagree (sim time vs wall time, an unsynchronised camera clock) and the
#: value says nothing about the node's speed; such frames are counted instead.
MAX_LATENCY_S = 3600.0

#: What a camera status says to do about messages the middleware lost.
LOST_ADVICE = ('use reliable input (input_reliability:=reliable) or the shipped middleware '
               'profile')

#: Where the stamp-to-publish latency of a frame goes, in order (seconds each): the image
#: reaching the node, waiting for the worker, decoding, the estimator call, building the
#: outputs, publishing them.
STAGES = ('transport', 'queue', 'decode', 'estimator', 'outputs', 'publish')


def _ms(seconds):
    return 'n/a' if not math.isfinite(seconds) else f'{1000.0 * seconds:.1f}'


class StreamStats:
    """Counters and windows of one camera (guarded by the collector's lock)."""

    def __init__(self, window_s, size):
        """Create empty statistics."""
        self.created = time.monotonic()
        self.last_received = None
        self.input_rate = RateMeter(window_s)
        self.output_rate = RateMeter(window_s)
        self.latency = Percentiles(size)
        self.estimator = Percentiles(size)
        self.stages = {name: Percentiles(size) for name in STAGES}
        self.received = 0
        self.published = 0
        self.dropped = 0
        self.lost = Counter()
        self.lost_at_last_report = 0
        self.off_clock = 0
        self.off_clock_at_last_report = 0
        self.bad = Counter()
        self.bad_at_last_report = 0
        self.notes = ()
        self.scale = None
        self.extra = []


class DiagnosticsCollector:
    """
    Thread-safe store of everything /diagnostics reports.

    A camera is a WARN when no image has come for ``silence_s`` while the node listens
    (:meth:`set_listening`) and the model is ready, and when ``metric_expected`` (scale
    recovery configured) but a frame had no metric scale.

    :param name: status name prefix (the node's fully qualified name, so two nodes in
        different namespaces are told apart by aggregators)
    :param window_s: window of the rate meters in seconds
    :param size: values kept for latency percentiles
    :param silence_s: seconds without an image after which a camera is a WARN
    """

    def __init__(self, name='marigold_depth', window_s=5.0, size=200, silence_s=5.0):
        """Create an empty collector."""
        self.name = name
        self.window_s = float(window_s)
        self.size = int(size)
        self.silence_s = float(silence_s)
        self.metric_expected = False
        self._listening_since = time.monotonic()  # a plain node listens from the start
        self._lock = threading.Lock()
        self._streams = {}
        self.model_state = MODEL_UNCONFIGURED
        self.model_message = ''
        self.model_info = {}

    def _stream(self, key):
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = StreamStats(self.window_s, self.size)
        return stream

    def add_stream(self, key):
        """Make a camera known before its first frame (it is reported as waiting)."""
        with self._lock:
            self._stream(key)

    def set_listening(self, listening, now=None):
        """Say whether the image subscriptions exist; silence counts only while they do."""
        with self._lock:
            self._listening_since = (time.monotonic() if now is None else now) \
                if listening else None

    def set_model_state(self, state, message='', **info):
        """
        Set the model state and details (model, device, dtype, settings...).

        :param state: MODEL_UNCONFIGURED, MODEL_LOADING, MODEL_READY or MODEL_ERROR
        :param message: human-readable detail (the error for MODEL_ERROR)
        :param info: key/values added to the model status (replacing same keys)
        """
        with self._lock:
            self.model_state = state
            self.model_message = message
            self.model_info.update({k: str(v) for k, v in info.items()})

    def update_model_info(self, **info):
        """Add or replace model status details, leaving its state and message as they are."""
        with self._lock:
            self.model_info.update({k: str(v) for k, v in info.items()})

    def image_received(self, key, now=None):
        """Count an incoming image of a camera namespace."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stream = self._stream(key)
            stream.received += 1
            stream.last_received = now
            stream.input_rate.add(now)

    def frame_dropped(self, key, count=1):
        """Count frames replaced by a newer one before the model could take them."""
        with self._lock:
            self._stream(key).dropped += count

    def messages_lost(self, key, topic, count):
        """Count messages lost on an input topic, e.g. 'image' (QoS message_lost event)."""
        with self._lock:
            self._stream(key).lost[topic] += int(count)

    def bad_message(self, key, reason):
        """Count a bad input by reason, e.g. 'truncated' or 'camera_info_size_mismatch'."""
        with self._lock:
            self._stream(key).bad[reason] += 1

    def frame_published(self, key, latency_s, estimator_s, notes=(), scale=None,
                        now=None, stages=None):
        """
        Record a published frame.

        A latency beyond :data:`MAX_LATENCY_S` (either sign) is a clock mix-up: the frame is
        counted as off the clock and its latency and transport time are not recorded.

        :param latency_s: image stamp to publish, seconds
        :param estimator_s: estimator time of the call that produced the frame, seconds
        :param notes: pipeline notes (why outputs are missing)
        :param scale: ScaleEstimate applied, or None
        :param stages: seconds per stage of :data:`STAGES` (missing ones are not recorded)
        """
        with self._lock:
            stream = self._stream(key)
            stream.published += 1
            stream.output_rate.add(now)
            off_clock = not abs(latency_s) <= MAX_LATENCY_S
            if off_clock:
                stream.off_clock += 1
            else:
                stream.latency.add(latency_s)
            stream.estimator.add(estimator_s)
            for name, seconds in (stages or {}).items():
                if name == 'transport' and off_clock:
                    continue
                if name in stream.stages:
                    stream.stages[name].add(seconds)
            stream.notes = tuple(notes)
            stream.scale = scale

    def set_extra(self, key, pairs):
        """Set extra (key, value) pairs for a camera status (e.g. scale recovery fields)."""
        with self._lock:
            self._stream(key).extra = [(str(k), str(v)) for k, v in pairs]

    def snapshot(self, key):
        """
        Return the counters of one camera (for tests and the demo summary).

        :return: dict with received, published, dropped, lost (dict input -> count),
            off_clock, bad (dict), notes, latency_p50_s, latency_p95_s, estimator_p50_s,
            input_rate_hz, output_rate_hz
        """
        with self._lock:
            stream = self._stream(key)
            return {
                'received': stream.received, 'published': stream.published,
                'dropped': stream.dropped, 'lost': dict(stream.lost),
                'off_clock': stream.off_clock, 'bad': dict(stream.bad), 'notes': stream.notes,
                'latency_p50_s': stream.latency.percentile(50),
                'latency_p95_s': stream.latency.percentile(95),
                'estimator_p50_s': stream.estimator.percentile(50),
                'input_rate_hz': stream.input_rate.rate(),
                'output_rate_hz': stream.output_rate.rate(),
            }

    def recent(self, key):
        """
        Return the recent per-frame values of one camera, oldest first, paired by frame.

        :return: dict with lists 'latency_s' and 'estimator_s', and '<stage>_s' for each of
            :data:`STAGES` (empty when not recorded)
        """
        with self._lock:
            stream = self._stream(key)
            recent = {f'{name}_s': values.values() for name, values in stream.stages.items()}
            recent.update(latency_s=stream.latency.values(),
                          estimator_s=stream.estimator.values())
            return recent

    # ------------------------------------------------------------------ message

    def to_msg(self, stamp=None, hardware_id='', now=None):
        """
        Build the DiagnosticArray: the model status, then one status per camera.

        :param stamp: builtin_interfaces/Time for the header (None: zero)
        :param hardware_id: hardware_id of every status (e.g. the device)
        """
        now = time.monotonic() if now is None else now
        msg = DiagnosticArray()
        if stamp is not None:
            msg.header.stamp = stamp
        with self._lock:
            msg.status.append(self._model_status(hardware_id))
            for key in sorted(self._streams):
                msg.status.append(self._stream_status(key, self._streams[key], hardware_id,
                                                      now))
        return msg

    def _model_status(self, hardware_id):
        level = {MODEL_READY: DiagnosticStatus.OK, MODEL_ERROR: DiagnosticStatus.ERROR}.get(
            self.model_state, DiagnosticStatus.WARN)
        text = {MODEL_READY: 'model ready', MODEL_LOADING: 'loading model',
                MODEL_UNCONFIGURED: 'not configured',
                MODEL_ERROR: 'model failed to load'}.get(self.model_state, self.model_state)
        if self.model_message:
            text += f': {self.model_message}'
        values = [('state', self.model_state)] + sorted(self.model_info.items())
        return DiagnosticStatus(level=level, name=f'{self.name}: model', message=text,
                                hardware_id=hardware_id,
                                values=[KeyValue(key=k, value=v) for k, v in values])

    def _stream_status(self, key, stream, hardware_id, now):
        bad_total = sum(stream.bad.values())
        new_bad = bad_total - stream.bad_at_last_report
        stream.bad_at_last_report = bad_total
        level, parts = DiagnosticStatus.OK, []
        if stream.received:
            parts.append(f'{stream.output_rate.rate(now):.1f} Hz out')
        # A camera that stopped (or never started once the model is ready) is a problem a
        # robot's monitor must see; while the model loads, waiting is normal.
        since = self._listening_since
        silent = now - max(stream.last_received if stream.received else stream.created,
                           since if since is not None else now)
        if since is not None and silent > self.silence_s and \
                (stream.received or self.model_state == MODEL_READY):
            level = DiagnosticStatus.WARN
            parts.append(f'no images for {silent:.0f} s')
        elif not stream.received:
            parts.append('waiting for images')
        missing = [n for n in stream.notes if n in _NOTE_TEXT]
        if 'no_camera_info' in missing or 'bad_camera_info' in missing or \
                ('no_metric_scale' in missing and self.metric_expected):
            level = DiagnosticStatus.WARN
        parts += [_NOTE_TEXT[n] for n in missing]
        if new_bad:
            level = DiagnosticStatus.WARN
            parts.append(f'{new_bad} bad messages since the last report')
        lost_total = sum(stream.lost.values())
        new_lost = lost_total - stream.lost_at_last_report
        stream.lost_at_last_report = lost_total
        if new_lost:
            level = DiagnosticStatus.WARN
            parts.append(f'{new_lost} messages lost by the middleware since the last report: '
                         f'{LOST_ADVICE}')
        new_off_clock = stream.off_clock - stream.off_clock_at_last_report
        stream.off_clock_at_last_report = stream.off_clock
        if new_off_clock:
            level = DiagnosticStatus.WARN
            parts.append(f'{new_off_clock} frames stamped more than {MAX_LATENCY_S:.0f} s from '
                         "the node's clock (sim time vs wall time?): latency not measured")
        values = [
            ('input rate (Hz)', f'{stream.input_rate.rate(now):.2f}'),
            ('output rate (Hz)', f'{stream.output_rate.rate(now):.2f}'),
            ('latency p50 (ms)', _ms(stream.latency.percentile(50))),
            ('latency p95 (ms)', _ms(stream.latency.percentile(95))),
            ('estimator p50 (ms)', _ms(stream.estimator.percentile(50))),
        ]
        values += [(f'{name} p50 (ms)', _ms(stream.stages[name].percentile(50)))
                   for name in STAGES if name != 'estimator' and len(stream.stages[name])]
        values += [
            ('frames received', str(stream.received)),
            ('frames published', str(stream.published)),
            ('frames dropped', str(stream.dropped)),
            ('messages lost (middleware)', str(lost_total)),
            ('frames off the clock', str(stream.off_clock)),
            ('bad messages', str(bad_total)),
        ]
        values += [(f'lost: {topic}', str(count)) for topic, count in sorted(stream.lost.items())]
        values += [(f'bad: {reason}', str(count)) for reason, count in sorted(stream.bad.items())]
        values.append(('missing outputs', ', '.join(missing) or 'none'))
        values.append(('metric scale', _scale_text(stream.scale)))
        values += stream.extra
        camera = key or '(node namespace)'
        return DiagnosticStatus(level=level, name=f'{self.name}: camera {camera}',
                                message='; '.join(parts), hardware_id=hardware_id,
                                values=[KeyValue(key=k, value=v) for k, v in values])


def _scale_text(scale):
    if scale is None:
        return 'none (relative depth only)'
    if scale.reason in ('fixed', 'guided'):
        return f'{scale.reason}: {scale.scale:.6g} * relative + {scale.shift:.6g} m'
    return f'{scale.status}: {scale.scale:.6g} * relative + {scale.shift:.6g} m'
