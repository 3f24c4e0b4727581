"""
Benchmark: frames per second of process_bag against the bare estimator on the same frames.

A bag of synthetic frames (Image rgb8 + CameraInfo) is written to a temporary folder, then,
alternating in one process with one loaded model:

* bare: ``DepthEstimator.estimate`` on the already decoded RGB frames, in the same batches
  process_bag uses (the model alone: no decoding, no outputs, no bag);
* process_bag: the whole run (open the bag, read and deserialize, decode, the same model
  calls, depth / camera info / metric depth / point cloud messages, canonical serialization,
  writing and moving the output bag into place).

The ratio fps(process_bag) / fps(bare) is the share of the model's speed the offline tool
keeps (target: at least 0.95).  No assertions (the machine is shared).  A fixed
metric scale is set so every output, the point cloud included, is made.  process_bag's
fixed costs (opening the bag, writing its metadata) are included, so few frames understate
its rate: the default 256 frames (26 s of a 10 Hz camera) is still a short recording.

Both are measured twice: with the model on every core (on a CPU-only machine the other
threads then take their time from the model) and with one core left over (what a GPU
gives: the model has its own compute, and the question is whether process_bag keeps it
fed).  At each setting both are warmed up first on one batch of frames (process_bag on a
bag of that many frames: imports, type registration, first-call allocations), so neither
side's first timed run is a cold one.  The paired ratio of each bare run and the
process_bag run after it is robust to the slow drifts of a shared machine; its median and
quartiles are printed.

With ``--stand-in-ms T`` the model is bench/stand_in.py (T ms per frame with the GIL
released, as a GPU model's thread waits, so the bare rate is 1000 / T fps) and the question
is only whether process_bag's reading, outputs and writing keep up with it.

Run: .venv/bin/python bench/process_bag.py [--frames 256 --height 240 --width 320
     --model bundled:marigold-tiny --repeats 5 --threads N [N ...]]
     .venv/bin/python bench/process_bag.py --stand-in-ms 20 --width 640 --height 480
"""

import argparse
import os
from pathlib import Path
import shutil
import tempfile
import time

from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_model.data.synthetic import render_sequence
from marigold_model.estimator import DepthEstimator
from marigold_model.loading import BUNDLED_DIR
from marigold_ros.bag_job import BagJob, format_summary
from marigold_ros.bag_processor import process_bag
from marigold_ros.conversions import rgb_to_image
import numpy as np
from rclpy.serialization import serialize_message
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import get_typestore, Stores
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Header
import torch


def _model(requested, folder):
    if requested:
        return requested
    if (BUNDLED_DIR / 'marigold-tiny' / 'model_index.json').is_file():
        return 'bundled:marigold-tiny'
    from marigold_model.architecture import build_random_marigold
    build_random_marigold(folder)
    print('(bundled tiny model missing: using a random model of the same architecture)')
    return str(folder)


def write_bag(path, frames, height, width):
    """
    Write a bag of synthetic frames with camera info at 10 Hz.

    :param path: output bag folder
    :param frames: number of frames
    :param height: image height
    :param width: image width
    :return: list of the RGB frames
    """
    from builtin_interfaces.msg import Time
    store = get_typestore(Stores.ROS2_KILTED)
    samples = render_sequence(np.random.default_rng(0), frames, height=height, width=width,
                              motion='orbit', noise=True)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        image_conn = writer.add_connection('/cam/image_raw', 'sensor_msgs/msg/Image',
                                           typestore=store)
        info_conn = writer.add_connection('/cam/camera_info', 'sensor_msgs/msg/CameraInfo',
                                          typestore=store)
        for i, sample in enumerate(samples):
            stamp = 10 ** 9 * 100 + i * 10 ** 8
            header = Header(frame_id='cam_optical',
                            stamp=Time(sec=stamp // 10 ** 9, nanosec=stamp % 10 ** 9))
            info = CameraInfo(header=header, width=width, height=height,
                              distortion_model='plumb_bob', d=[0.0] * 5)
            info.k = sample.K.reshape(-1).tolist()
            info.r = np.eye(3).reshape(-1).tolist()
            info.p = np.hstack([sample.K, np.zeros((3, 1))]).reshape(-1).tolist()
            writer.write(image_conn, stamp + 1000,
                         serialize_message(rgb_to_image(sample.rgb, header)))
            writer.write(info_conn, stamp + 2000, serialize_message(info))
    return [s.rgb for s in samples]


def _clocks():
    """Wall time, CPU time of this thread and CPU time of the whole process."""
    return np.array([time.perf_counter(), time.thread_time(), time.process_time()])


def bare(estimator, frames, batch):
    """
    Time the model alone on the frames, in process_bag's batches.

    :param estimator: DepthEstimator
    :param frames: RGB frames
    :param batch: frames per call
    :return: seconds as [wall, CPU of this thread, CPU of the process]
    """
    start = _clocks()
    for first in range(0, len(frames), batch):
        estimator.estimate(frames[first:first + batch])
    return _clocks() - start


class _Metered:
    """The estimator, counting the CPU time of the threads that call it."""

    def __init__(self, estimator):
        self.estimator = estimator
        self.cpu = 0.0

    def set_inference(self, inference):
        self.estimator.set_inference(inference)

    def estimate(self, frames, keys=None):
        start = time.thread_time()
        try:
            return self.estimator.estimate(frames, keys=keys)
        finally:
            self.cpu += time.thread_time() - start


def offline(estimator, bag, folder, params, run):
    """
    Time a whole process_bag run (output removed afterwards).

    :param estimator: DepthEstimator
    :param bag: input bag
    :param folder: scratch folder
    :param params: params file
    :param run: run number (output name)
    :return: (seconds as [wall, CPU of this thread, CPU of the process, CPU in the
        estimator, wall time in the estimator], BagSummary)
    """
    out = Path(folder) / f'out{run}'
    metered = _Metered(estimator)
    start = _clocks()
    summary = process_bag(BagJob(input=bag, output=str(out), params=params, quiet=True),
                          estimator=metered)
    seconds = np.append(_clocks() - start, [metered.cpu, summary.estimator_seconds])
    shutil.rmtree(out)
    return seconds, summary


def measure(estimator, bag, warm_bag, folder, params, frames, batch, repeats, threads):
    """
    Alternate bare and process_bag runs with the model on ``threads`` torch threads.

    :param estimator: DepthEstimator
    :param bag: input bag
    :param warm_bag: a bag of one batch of frames, for process_bag's warm-up run
    :param folder: scratch folder
    :param params: params file
    :param frames: the RGB frames of the bag
    :param batch: frames per model call
    :param repeats: pairs of runs
    :param threads: torch intra-op threads
    :return: (bare seconds per repeat, process_bag seconds per repeat, last BagSummary)
    """
    torch.set_num_threads(threads)
    # Warm-up at this thread count, one batch each: the timed runs are all warm.
    bare(estimator, frames[:batch], batch)
    offline(estimator, warm_bag, folder, params, 'warm')
    bare_times, bag_times = [], []
    for run in range(repeats):
        bare_times.append(bare(estimator, frames, batch))
        seconds, summary = offline(estimator, bag, folder, params, run)
        bag_times.append(seconds)
        print(f'  repeat {run}: bare {len(frames) / bare_times[-1][0]:.2f} fps, '
              f'process_bag {len(frames) / seconds[0]:.2f} fps, '
              f'ratio {bare_times[-1][0] / seconds[0]:.3f}')
    return np.array(bare_times), np.array(bag_times), summary


def report(bare_times, bag_times, frames):
    """
    Print the figures of one thread setting.

    :param bare_times: [repeats, 3] seconds (wall, thread CPU, process CPU)
    :param bag_times: [repeats, 5] seconds (wall, main thread CPU, process CPU, estimator CPU,
        estimator wall)
    :param frames: frames per run
    """
    paired = bare_times[:, 0] / bag_times[:, 0]
    low, median, high = np.percentile(paired, [25, 50, 75])
    bare_t, bag_t = np.median(bare_times, axis=0), np.median(bag_times, axis=0)
    print(f'  wall clock: bare estimator {frames / bare_t[0]:.2f} fps, process_bag '
          f'{frames / bag_t[0]:.2f} fps; ratio: median of the {len(paired)} paired runs '
          f'{median:.3f} (quartiles {low:.3f}-{high:.3f}), of the medians '
          f'{bare_t[0] / bag_t[0]:.3f}; target >= 0.95')
    per_frame = 1e3 / frames
    model_cpu, main_cpu = bag_t[3] * per_frame, bag_t[1] * per_frame
    print(f'  CPU ms per frame: bare estimator {bare_t[2] * per_frame:.1f}; process_bag '
          f'{bag_t[2] * per_frame:.1f} in all threads = estimator {model_cpu:.1f} + pipeline '
          f'outputs and matching (main thread) {main_cpu:.1f} + reading, decoding ahead and '
          f'writing (other threads) {bag_t[2] * per_frame - model_cpu - main_cpu:.1f}')
    # The ratio split in two factors measured inside each run, so the machine's drift
    # between runs mostly cancels: how much of process_bag's time the model is running, and
    # how much of the model thread's time it spends waiting (for the GIL or a core).
    busy = np.median(bag_times[:, 4] / bag_times[:, 0])
    waiting = np.median((bag_times[:, 4] - bag_times[:, 3]) / bag_times[:, 4])
    print(f'  inside process_bag: the model runs {100 * busy:.1f} % of the time; its thread '
          f'waits during {100 * waiting:.1f} % of its calls (GIL or core; a bare call waits '
          f'{100 * np.median(1 - bare_times[:, 1] / bare_times[:, 0]):.1f} %)')


def main(argv=None):
    """
    Run the benchmark and print the figures.

    :param argv: arguments (default sys.argv)
    """
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--frames', type=int, default=256)
    parser.add_argument('--height', type=int, default=240)
    parser.add_argument('--width', type=int, default=320)
    parser.add_argument('--model', default=None, help='default: bundled:marigold-tiny')
    parser.add_argument('--processing-resolution', type=int, default=0)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, nargs='*', default=None,
                        help='torch thread counts to measure (default: all cores, and all '
                             'cores but one)')
    parser.add_argument('--stand-in-ms', type=float, default=None, metavar='T',
                        help='instead of the model: bench/stand_in.py taking T ms per frame '
                             'with the GIL released (as a GPU model); bare is then N x T')
    args = parser.parse_args(argv)
    cores = torch.get_num_threads()
    settings = args.threads or sorted({cores, max(1, cores - 1)}, reverse=True)
    if args.stand_in_ms is not None:
        settings = settings[:1]  # the stand-in uses no torch threads
    with tempfile.TemporaryDirectory(prefix='bench_process_bag_') as folder:
        model = 'stand-in' if args.stand_in_ms is not None else \
            _model(args.model, Path(folder) / 'model')
        bag = str(Path(folder) / 'in')
        frames = write_bag(bag, args.frames, args.height, args.width)
        warm_bag = str(Path(folder) / 'warm')
        write_bag(warm_bag, args.batch, args.height, args.width)
        inference = InferenceConfig(processing_resolution=args.processing_resolution,
                                    batch_size=args.batch)
        params = Path(folder) / 'depth.yaml'
        params.write_text('marigold_depth:\n  ros__parameters:\n'
                          f'    model: {model!r}\n    device: cpu\n'
                          f'    processing_resolution: {args.processing_resolution}\n'
                          f'    batch_size: {args.batch}\n    fixed_scale: 4.0\n'
                          '    fixed_shift: 0.5\n')
        config = EstimatorConfig(ModelConfig(model=model, device='cpu'), inference)
        if args.stand_in_ms is not None:
            from stand_in import StandInEstimator  # bench/stand_in.py, next to this file
            estimator = StandInEstimator(args.stand_in_ms, config)
            print(f'stand-in model: {args.stand_in_ms:g} ms per frame '
                  f'({1000 / args.stand_in_ms:.1f} fps), load {os.getloadavg()[0]:.1f}')
        else:
            estimator = DepthEstimator(config)
        results = []
        for threads in settings:
            print(f'torch threads {threads} of {cores} cores:')
            results.append(measure(estimator, bag, warm_bag, folder, str(params), frames,
                                   args.batch, args.repeats, threads))
        steps, resolution = estimator.resolved_settings()
        summary = results[-1][2]
        print(f'\nmodel {model}, {args.frames} frames {args.width}x{args.height}, processing '
              f'resolution {resolution}, {steps} steps, batch {args.batch}, outputs: '
              f'{sorted(summary.topics_out)}')
        for threads, (bare_times, bag_times, _) in zip(settings, results):
            spare = cores - threads
            print(f'torch threads {threads}: ' + (
                'the model on every core, so the reading, output and writing threads take '
                'their CPU time from it' if spare <= 0 else
                f'{spare} core(s) left to the reading, output and writing threads, as a GPU '
                'leaves the CPU to them'))
            report(bare_times, bag_times, args.frames)
        print('\nlast run summary:\n' + format_summary(summary))


if __name__ == '__main__':
    main()
