"""
Frames lost between two processes: a 30 Hz 640x480 rgb8 camera and a best-effort subscriber.

Camera drivers publish best effort; on Fast DDS (the rmw of the PyPI wheels and the ROS 2
default) a best-effort image larger than the shared-memory segment (512 KiB by default) or
than the UDP socket buffers loses fragments across processes, and a sample with a missing
fragment is dropped whole.  This bench runs a publisher process and a subscriber process
(plain rclpy, nothing of marigold_ros) for each middleware configuration and prints frames
sent and received:

- ``default``: no profile file, Fast DDS as the rmw configures it;
- ``profile``: ``config/fastdds_large_data.xml`` through FASTDDS_DEFAULT_PROFILES_FILE
  (FASTRTPS_DEFAULT_PROFILES_FILE for Fast DDS 2 / Jazzy) in both processes;
- ``profile-camera`` / ``profile-subscriber``: the profile in that process only (which side
  needs it);
- ``reliable``: no profile, both sides reliable (what ``input_reliability: reliable``
  gives when the camera publishes reliable).

Both processes run with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a ROS_DOMAIN_ID of
their own, so other runs on the machine do not join.  The figures depend on the machine's
load (a subscriber that cannot keep up also loses frames), so each configuration can be
repeated with ``--runs``.  No assertion: the figures are printed as measured.

Run: .venv/bin/python bench/transport.py [--seconds 10] [--rate 30] [--runs 1]
     [--configs default,profile,reliable] [--profile config/fastdds_large_data.xml]
"""

import argparse
from array import array
import json
import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import threading
import time

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / 'config' / 'fastdds_large_data.xml'
TOPIC = 'bench_transport/image'
WIDTH, HEIGHT = 640, 480


def _qos(reliable):
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5,
                      reliability=ReliabilityPolicy.RELIABLE if reliable
                      else ReliabilityPolicy.BEST_EFFORT)


def publish(frames, rate, reliable):
    """Publish ``frames`` rgb8 images at ``rate`` Hz once a subscriber has matched."""
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node('bench_camera')
    publisher = node.create_publisher(Image, TOPIC, _qos(reliable))
    msg = Image(height=HEIGHT, width=WIDTH, encoding='rgb8', step=WIDTH * 3)
    msg.data = array('B', bytes(range(256)) * (WIDTH * HEIGHT * 3 // 256))
    while publisher.get_subscription_count() < 1:  # discovery
        rclpy.spin_once(node, timeout_sec=0.05)
    time.sleep(1.0)  # let the subscriber's side of the match settle too
    period = 1.0 / rate
    start = time.monotonic()
    for index in range(frames):
        delay = start + index * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        msg.header.frame_id = str(index)
        msg.header.stamp = node.get_clock().now().to_msg()
        publisher.publish(msg)
    elapsed = time.monotonic() - start
    time.sleep(0.5)  # reliable: give the last samples time to be acknowledged
    node.destroy_node()
    rclpy.shutdown()
    print(json.dumps({'sent': frames, 'rate_hz': round(frames / elapsed, 2)}), flush=True)


def subscribe(reliable):
    """Count the distinct frames received until SIGTERM; print them as JSON."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import Image

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node('bench_subscriber')
    received = set()
    node.create_subscription(Image, TOPIC, lambda m: received.add(m.header.frame_id),
                             _qos(reliable))
    print('ready', flush=True)
    while not stop.is_set():
        rclpy.spin_once(node, timeout_sec=0.05)
    node.destroy_node()
    rclpy.shutdown()
    print(json.dumps({'received': len(received)}), flush=True)


def profile_variable():
    """Return the variable naming the profiles file: Fast DDS 3 (Kilted) or 2 (Jazzy)."""
    from importlib.metadata import version
    jazzy = int(version('rclpy').split('.')[0]) < 8  # Jazzy's rclpy is 7.x, Kilted's 9.x
    return 'FASTRTPS_DEFAULT_PROFILES_FILE' if jazzy else 'FASTDDS_DEFAULT_PROFILES_FILE'


def run_once(config, frames, rate, profile, domain):
    """Run one publisher / subscriber pair; return sent, received and the publish rate."""
    plain = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
                 ROS_DOMAIN_ID=str(domain), RMW_IMPLEMENTATION='rmw_fastrtps_cpp')
    plain.pop('FASTDDS_DEFAULT_PROFILES_FILE', None)
    plain.pop('FASTRTPS_DEFAULT_PROFILES_FILE', None)
    with_profile = dict(plain, **{profile_variable(): str(profile)})
    env = {'camera': plain, 'subscriber': plain}
    if config == 'profile':
        env = {'camera': with_profile, 'subscriber': with_profile}
    elif config.startswith('profile-'):
        env[config.split('-', 1)[1]] = with_profile
    reliable = ['--reliable'] if config == 'reliable' else []
    command = [sys.executable, __file__, '--role']
    subscriber = subprocess.Popen(command + ['subscribe'] + reliable, env=env['subscriber'],
                                  stdout=subprocess.PIPE, text=True)
    try:
        assert subscriber.stdout.readline().strip() == 'ready'
        publisher = subprocess.run(
            command + ['publish', '--frames', str(frames), '--rate', str(rate)] + reliable,
            env=env['camera'], stdout=subprocess.PIPE, text=True, check=True)
        time.sleep(1.0)  # samples still in flight
        subscriber.send_signal(signal.SIGTERM)
        out, _ = subscriber.communicate(timeout=30)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
    result = json.loads(publisher.stdout.strip().splitlines()[-1])
    result.update(json.loads(out.strip().splitlines()[-1]))
    return result


def main():
    """Run the configurations and print sent / received per run."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--role', choices=('publish', 'subscribe'), help=argparse.SUPPRESS)
    parser.add_argument('--reliable', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--frames', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--seconds', type=float, default=10.0)
    parser.add_argument('--rate', type=float, default=30.0)
    parser.add_argument('--runs', type=int, default=1)
    parser.add_argument('--configs', default='default,profile,reliable')
    parser.add_argument('--profile', type=Path, default=PROFILE)
    args = parser.parse_args()
    if args.role == 'publish':
        return publish(args.frames, args.rate, args.reliable)
    if args.role == 'subscribe':
        return subscribe(args.reliable)
    frames = int(round(args.seconds * args.rate))
    from importlib.metadata import version
    print(f'{WIDTH}x{HEIGHT} rgb8 ({WIDTH * HEIGHT * 3} bytes) at {args.rate} Hz, '
          f'{frames} frames per run, rclpy {version("rclpy")}, profile {args.profile} via '
          f'{profile_variable()}')
    print('| config | run | sent | received | lost % | publish Hz |')
    print('|---|---|---|---|---|---|')
    for config in args.configs.split(','):
        for run in range(args.runs):
            domain = random.randint(100, 200)  # a domain of its own (0-232 are valid)
            result = run_once(config, frames, args.rate, args.profile.resolve(), domain)
            lost = 100.0 * (result['sent'] - result['received']) / result['sent']
            print(f"| {config} | {run + 1} | {result['sent']} | {result['received']} | "
                  f"{lost:.1f} | {result['rate_hz']} |", flush=True)


if __name__ == '__main__':
    main()
