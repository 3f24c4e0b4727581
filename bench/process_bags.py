"""
Benchmark: throughput of process_bags with 2 workers of 1 thread against 1 worker of 1 thread.

Several bags of synthetic frames (Image rgb8 + CameraInfo, as bench/process_bag.py writes
them) are processed by ``process_bags`` on a local Ray, once with one CPU worker and once
with two, each of one torch thread, alternating, ``--repeats`` times.  Each run starts its
own local Ray (not timed) and its workers, which first process one two-frame bag each (the
worker process starts and loads the model: seconds, paid once per worker), then the bags;
frames/s = frames of all bags / the time of that second round (warm workers, what a long
run sees), the speed-up is the median of the paired ratios (target >= 1.7 on an idle
2-core machine).  The ratio with the start-up included is printed too.  The load average
before and after is printed: other processes on a shared machine take cores from the
workers.

``--control`` also times one and two plain processes running process_bag's code on the
same bags without Ray: on a loaded machine it shows what two processes can gain at all.

Run: .venv/bin/python bench/process_bags.py [--bags 4 --frames 32 --height 240 --width 320
     --model bundled:marigold-tiny --repeats 2 --control]
"""

import argparse
from dataclasses import replace
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


def one_run(bags, warm_bags, out, params, model, workers):
    """
    Process every bag with ``workers`` one-thread CPU workers; return the seconds.

    :param bags: list of bag folders (timed)
    :param warm_bags: one small bag per worker, processed first (each worker loads the model)
    :param out: output folder (removed afterwards)
    :param params: params file
    :param model: model argument
    :param workers: number of workers
    :return: (seconds of the timed bags with warm workers, seconds from the start of the
        workers to the last output: actor start, model load and the warm bags included)
    """
    args = process_bags.build_parser().parse_args(
        [*bags, '--output-dir', str(out), '--params', str(params), '--model', model,
         '--workers', str(workers), '--threads-per-worker', '1', '--quiet'])
    base = process_bags.BagJob(input='', output='', params=str(params), model=model,
                               quiet=True)
    out.mkdir()
    warm = process_bags.plan([Path(b) for b in warm_bags[:workers]], base, out)
    tasks = process_bags.plan([Path(b) for b in bags], base, out)
    count, options, started = process_bags.start_ray(args)
    try:
        clock = time.perf_counter()
        pool = process_bags.WorkerPool(count, options, threads=1)
        process_bags.run_tasks(warm, pool, quiet=True)
        steady = time.perf_counter()
        process_bags.run_tasks(tasks, pool, quiet=True)
        end = time.perf_counter()
    finally:
        import ray
        ray.shutdown()
    failed = [t.name for t in warm + tasks if t.status != 'done']
    if failed:
        raise RuntimeError(f'failed: {failed}: {[t.error for t in tasks]}')
    shutil.rmtree(out)
    # Per task: wall time in the worker, the processing loop, the estimator calls in it.
    print('    tasks (worker s / loop s / estimator s): ' + ', '.join(
        f'{t.seconds:.1f}/{t.summary.seconds:.1f}/{t.summary.estimator_seconds:.1f}'
        for t in tasks))
    return end - steady, end - clock


def plain_bag(bag, out, params, model):
    """
    Process one bag with process_bag's BagProcessor in this process, warm; return frames/s.

    :param bag: bag folder
    :param out: output folder (must not exist)
    :param params: params file
    :param model: model argument
    :return: frames per second of the whole bag, after a two-frame warm-up run
    """
    import torch

    from marigold_ros.bag_processor import BagProcessor
    torch.set_num_threads(1)
    job = process_bags.BagJob(input=bag, output=out + '_warm', params=str(params), model=model,
                              quiet=True, frames=(0, 2))
    warm = BagProcessor(job)
    warm.run()
    clock = time.perf_counter()
    summary = BagProcessor(replace(job, output=out, frames=None),
                           warm.estimator).run()
    return summary.frames_in / (time.perf_counter() - clock)


def control(bags, folder, params, model):
    """
    Return the speed-up of two plain processes (no Ray) over one: what the machine allows.

    :param bags: two bag folders
    :param folder: scratch folder
    :param params: params file
    :param model: model argument
    :return: (frames/s of one process, total frames/s of two at once)
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    context = multiprocessing.get_context('spawn')
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        one = pool.submit(plain_bag, bags[0], str(folder / 'c1'), params, model).result()
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        both = [pool.submit(plain_bag, bag, str(folder / f'c2_{k}'), params, model)
                for k, bag in enumerate(bags[:2])]
        two = sum(f.result() for f in both)
    return one, two


def main():
    """Run the benchmark and print frames/s and the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bags', type=int, default=4)
    parser.add_argument('--frames', type=int, default=32, help='frames per bag')
    parser.add_argument('--height', type=int, default=240)
    parser.add_argument('--width', type=int, default=320)
    parser.add_argument('--model', default=None)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--control', action='store_true', help='also time one and two plain '
                        'processes (no Ray) on the same bags: what the machine allows')
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
        warm_bags = []
        for k in range(2):
            write_bag(folder / f'warm{k}', 2, args.height, args.width)
            warm_bags.append(str(folder / f'warm{k}'))
        total = args.bags * args.frames
        print(f'{args.bags} bags x {args.frames} frames {args.width}x{args.height}, model '
              f'{model}; cpus {os.cpu_count()}; load before {os.getloadavg()}')
        ratios, cold_ratios, rates = [], [], {1: [], 2: []}
        for repeat in range(args.repeats):
            seconds, cold = {}, {}
            for workers in (1, 2):
                seconds[workers], cold[workers] = one_run(bags, warm_bags, folder / 'out',
                                                          params, model, workers)
                rates[workers].append(total / seconds[workers])
                print(f'  repeat {repeat}: {workers} worker(s): {seconds[workers]:.1f} s warm, '
                      f'{total / seconds[workers]:.2f} frames/s; {cold[workers]:.1f} s with '
                      f'start-up (load {os.getloadavg()})')
            ratios.append(seconds[1] / seconds[2])
            cold_ratios.append(cold[1] / cold[2])
        print(f'frames/s with warm workers, 1 worker: median {np.median(rates[1]):.2f}; '
              f'2 workers: median {np.median(rates[2]):.2f}; speed-up median '
              f'{np.median(ratios):.2f}x (runs: {", ".join(f"{r:.2f}" for r in ratios)}); '
              f'with start-up: {np.median(cold_ratios):.2f}x; load after {os.getloadavg()}')
        if args.control:
            one, two = control(bags, folder, params, model)
            print(f'control without Ray: 1 process {one:.2f} frames/s, 2 processes '
                  f'{two:.2f} frames/s: {two / one:.2f}x (load {os.getloadavg()})')
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
