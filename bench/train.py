"""
Training throughput: optimiser steps and samples per second, and peak memory.

Runs the real Trainer for a few steps on procedural scenes: the bundled tiny model on the CPU,
and on CUDA (when present) also a full-size model given with --full-model (e.g. a local copy
of prs-eth/marigold-depth-v1-1) in fp16 with gradient checkpointing.

    python bench/train.py [--steps 6] [--full-model PATH]
"""

import argparse
import resource
import statistics
import tempfile
import time

from marigold_model.training.train_config import DataSpec, TrainConfig
from marigold_model.training.trainer import Trainer
import torch


def measure(base, steps, size, batch, **changes):
    """
    Time ``steps`` optimiser steps after one warm-up step; every row the same way.

    The rate comes from the median step time (robust to a shared machine).  Filling the
    latent cache is a cost paid once per run, before the first step (as the recipe does):
    it is timed and returned apart, not hidden.

    :param size: square training resolution
    :param changes: extra TrainConfig settings
    :return: (steps per second, samples per second, seconds spent filling the cache)
    """
    config = TrainConfig(output_dir=tempfile.mkdtemp(prefix='bench_train_'), base_model=base,
                         data=(DataSpec('synthetic', '', 1.0, {'length': 256}),),
                         height=size, width=size, batch_size=batch, grad_accumulation=1,
                         max_steps=steps + 1, warmup_steps=1, progress=False, **changes)
    trainer = Trainer(config)
    prefill = 0.0
    if config.cache_latents:
        clock = time.perf_counter()
        trainer.prefill_latent_cache()  # as the recipe does: the steps then skip the VAE
        prefill = time.perf_counter() - clock
    trainer.train_step()
    times = []
    for _ in range(steps):
        clock = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - clock)
    step = statistics.median(times)
    return 1.0 / step, batch / step, prefill


def main(argv=None):
    """Print the throughput table."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=6)
    parser.add_argument('--full-model', default='')
    args = parser.parse_args(argv)
    print(f'median of {args.steps} steps after one warm-up step')
    print('| model | device | resolution | batch | steps/s | samples/s | cache fill s |')
    print('|---|---|---|---|---|---|---|')
    for batch, cached in ((32, False), (16, False), (16, True)):
        rate, samples, prefill = measure('bundled:marigold-tiny', args.steps, 64, batch,
                                         cache_latents=cached)
        label = 'tiny, latents cached (the recipe)' if cached else 'tiny, VAE every step'
        fill = f'{prefill:.1f}' if cached else '-'
        print(f'| {label} | cpu | 64 | {batch} | {rate:.2f} | {samples:.1f} | {fill} |')
    print(f'peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}'
          ' MiB')
    if torch.cuda.is_available() and args.full_model:
        torch.cuda.reset_peak_memory_stats()
        rate, samples, _ = measure(args.full_model, args.steps, 512, 2,
                                   mixed_precision='fp16', gradient_checkpointing=True)
        print(f'| full | cuda | 512 | 2 | {rate:.2f} | {samples:.1f} | - |')
        print(f'peak CUDA memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB')


if __name__ == '__main__':
    main()
