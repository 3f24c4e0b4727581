"""
The interpreter's GIL hand-over interval while a model thread runs (node and process_bag).

The model thread waits for the device with the GIL released, then queues for it behind the
threads that build and publish outputs; Python hands the GIL over every 5 ms by default.
"""

import contextlib
import sys

#: 1 ms, measured in one quiet run with the stand-in model: bench/process_bag.py T=20 went
#: from 0.936 to 0.953 of the bare model's rate, bench/node.py T=10 from 73 to 80 fps (the
#: model call from 12.0 to 11.0 ms for 10 ms of waiting).
MODEL_THREAD_SWITCH_INTERVAL_S = 0.001


@contextlib.contextmanager
def quick_gil_handover(interval=MODEL_THREAD_SWITCH_INTERVAL_S):
    """Lower the switch interval to ``interval`` inside the block (never raise it; restored)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, interval))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)
