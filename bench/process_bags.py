"""
Benchmark: throughput of process_bags with 2 workers of 1 thread against 1 worker of 1 thread.

Several bags of synthetic frames (Image rgb8 + CameraInfo, as bench/process_bag.py writes
them) are processed by ``process_bags`` on a local Ray, once with one CPU worker and once
with two, each of one torch thread, alternating, ``--repeats`` times.  Each run starts its
own local Ray (not timed) and is timed from the first task submitted to the last output in
place: model loading in each worker (once, in parallel) is included, as a user pays it.
frames/s = frames of all bags / that time; the speed-up is the median of the paired ratios
(target >= 1.7 on an idle 2-core machine).  The load average before and after is printed:
other processes on a shared machine take cores from the workers.

Run: .venv/bin/python bench/process_bags.py [--bags 4 --frames 32 --height 240 --width 320
     --model bundled:marigold-tiny --repeats 2]
"""

import argparse
import os
from pathlib import Path
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from process_bag import _model, write_bag  # noqa: E402 - the bag writer of bench/process_bag

from marigold_ros import process_bags  # noqa: E402, I100 - after the bench folder is on the path

PARAMS = """\
/**:
  ros__parameters:
    device: cpu
    batch_size: 1
    seed: 0
"""


def one_run(bags, out, params, model, workers):
    """
    Process every bag with ``workers`` one-thread CPU workers; return the timed seconds.

    :param bags: list of bag folders
    :param out: output folder (removed afterwards)
    :param params: params file
    :param model: model argument
    :param workers: number of workers
    :return: seconds from the first submission to the last output
    """
    args = process_bags.build_parser().parse_args(
        [*bags, '--output-dir', str(out), '--params', str(params), '--model', model,
         '--workers', str(workers), '--threads-per-worker', '1', '--quiet'])
    base = process_bags.BagJob(input='', output='', params=str(params), model=model,
                               quiet=True)
    out.mkdir()
    tasks = process_bags.plan([Path(b) for b in bags], base, out)
    count, options, started = process_bags.start_ray(args)
    try:
        clock = time.perf_counter()
        process_bags.run_tasks(tasks, count, options, threads=1, quiet=True)
        seconds = time.perf_counter() - clock
    finally:
        import ray
        ray.shutdown()
    failed = [t.name for t in tasks if t.status != 'done']
    if failed:
        raise RuntimeError(f'failed: {failed}: {[t.error for t in tasks]}')
    shutil.rmtree(out)
    return seconds


def main():
    """Run the benchmark and print frames/s and the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bags', type=int, default=4)
    parser.add_argument('--frames', type=int, default=32, help='frames per bag')
    parser.add_argument('--height', type=int, default=240)
    parser.add_argument('--width', type=int, default=320)
    parser.add_argument('--model', default=None)
    parser.add_argument('--repeats', type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    folder = Path(tempfile.mkdtemp(prefix='bench_process_bags_'))
    try:
        model = _model(args.model, folder / 'model')
        params = folder / 'params.yaml'
        params.write_text(PARAMS)
        bags = []
        for k in range(args.bags):
            write_bag(folder / f'bag{k}', args.frames, args.height, args.width)
            bags.append(str(folder / f'bag{k}'))
        total = args.bags * args.frames
        print(f'{args.bags} bags x {args.frames} frames {args.width}x{args.height}, model '
              f'{model}; cpus {os.cpu_count()}; load before {os.getloadavg()}')
        ratios, rates = [], {1: [], 2: []}
        for repeat in range(args.repeats):
            seconds = {}
            for workers in (1, 2):
                seconds[workers] = one_run(bags, folder / 'out', params, model, workers)
                rates[workers].append(total / seconds[workers])
                print(f'  repeat {repeat}: {workers} worker(s): {seconds[workers]:.1f} s, '
                      f'{total / seconds[workers]:.2f} frames/s  (load {os.getloadavg()})')
            ratios.append(seconds[1] / seconds[2])
        print(f'frames/s 1 worker: median {np.median(rates[1]):.2f}; 2 workers: median '
              f'{np.median(rates[2]):.2f}; speed-up median {np.median(ratios):.2f}x '
              f'(runs: {", ".join(f"{r:.2f}" for r in ratios)}); load after {os.getloadavg()}')
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
