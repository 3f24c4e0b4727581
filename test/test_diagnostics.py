"""Tests of marigold_ros.diagnostics: lost messages and stamps off the node's clock."""

from diagnostic_msgs.msg import DiagnosticStatus
from marigold_ros.diagnostics import DiagnosticsCollector, MAX_LATENCY_S


def _camera(collector, now):
    status = collector.to_msg(now=now).status[1]
    return status, {kv.key: kv.value for kv in status.values}


def test_lost_messages_are_a_warning_with_advice_once_per_loss():
    """Messages the middleware lost: counted per input, a WARN that says what to do."""
    collector = DiagnosticsCollector('n')
    collector.set_model_state('ready')
    collector.image_received('cam', now=100.0)
    assert _camera(collector, 100.5)[0].level == DiagnosticStatus.OK
    collector.messages_lost('cam', 'image', 12)
    collector.messages_lost('cam', 'camera_info', 1)
    status, values = _camera(collector, 100.5)
    assert status.level == DiagnosticStatus.WARN
    assert '13 messages lost by the middleware' in status.message
    assert 'input_reliability:=reliable' in status.message
    assert values['messages lost (middleware)'] == '13'
    assert (values['lost: image'], values['lost: camera_info']) == ('12', '1')
    assert collector.snapshot('cam')['lost'] == {'image': 12, 'camera_info': 1}
    # The next report has nothing new: OK again, the totals stay.
    status, values = _camera(collector, 100.6)
    assert status.level == DiagnosticStatus.OK and values['messages lost (middleware)'] == '13'


def test_stamps_off_the_clock_are_counted_not_latencies():
    """A 2 h 'latency' is a clock mix-up: counted and flagged, kept out of the percentiles."""
    collector = DiagnosticsCollector('n')
    collector.set_model_state('ready')
    collector.image_received('cam', now=10.0)
    collector.frame_published('cam', 0.25, 0.1, now=10.0,
                              stages={'transport': 0.01, 'queue': 0.02})
    for latency in (7200.0, -MAX_LATENCY_S - 1.0, float('nan')):
        collector.frame_published('cam', latency, 0.1, now=10.1,
                                  stages={'transport': latency, 'queue': 0.03})
    snapshot = collector.snapshot('cam')
    assert snapshot['off_clock'] == 3 and snapshot['latency_p50_s'] == 0.25
    recent = collector.recent('cam')
    assert recent['latency_s'] == [0.25] and recent['transport_s'] == [0.01]
    assert recent['queue_s'] == [0.02, 0.03, 0.03, 0.03]
    status, values = _camera(collector, 10.2)
    assert status.level == DiagnosticStatus.WARN and 'sim time' in status.message
    assert values['frames off the clock'] == '3' and values['latency p50 (ms)'] == '250.0'
    assert _camera(collector, 10.3)[0].level == DiagnosticStatus.OK
