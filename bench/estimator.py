"""
Benchmark DepthEstimator against diffusers' MarigoldDepthPipeline, measured in one run.

Prints per-stage times, peak memory, the time ratio ours / diffusers on the same model, input
and settings (calls interleaved so machine noise hits both alike), and the video flicker of
independent frames against warm-started ones. On CUDA it also prints frames per second. With
onnxruntime installed, a second table times the onnxruntime backend (the model exported to a
temporary folder) against the torch backend on the CPU, same settings, calls interleaved.

    python bench/estimator.py [--model bundled:marigold-tiny] [--repeats 15]
"""

import argparse
from dataclasses import replace
import importlib.util
import resource
import statistics
import tempfile
import time

from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_model.estimator import DepthEstimator
from marigold_model.loading import BUNDLED_DIR, EMPTY_TEXT_FILE, resolve_model_path
import numpy as np
import torch


def _model_name(requested):
    if requested:
        return requested
    if (BUNDLED_DIR / 'marigold-tiny' / 'model_index.json').is_file():
        return 'bundled:marigold-tiny'
    from marigold_model.architecture import build_random_marigold
    path = tempfile.mkdtemp(prefix='bench_marigold_')
    build_random_marigold(path)
    print('(bundled tiny model missing: using a random model of the same architecture)')
    return path


def _pipeline(model, device, dtype):
    from diffusers import MarigoldDepthPipeline
    from safetensors.torch import load_file
    path = resolve_model_path(model)
    pipe = MarigoldDepthPipeline.from_pretrained(path, text_encoder=None, tokenizer=None,
                                                 torch_dtype=dtype).to(device)
    pipe.empty_text_embedding = load_file(path / EMPTY_TEXT_FILE)['embedding'].to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def compare(estimator, pipe, frame, inference, repeats):
    """
    Median seconds per call of ours and of diffusers, interleaved.

    :param pipe: MarigoldDepthPipeline on the same weights
    :return: (ours, theirs, stage timings of our last call)
    """
    estimator.set_inference(inference)
    steps, resolution = estimator.resolved_settings()
    ours, theirs, stages = [], [], {}
    for index in range(repeats + 2):
        clock = time.perf_counter()
        result = estimator.estimate(frame)
        _sync(estimator.device)
        mine = time.perf_counter() - clock
        clock = time.perf_counter()
        pipe(frame, num_inference_steps=steps, ensemble_size=inference.ensemble_size,
             processing_resolution=resolution, batch_size=inference.batch_size,
             generator=torch.Generator().manual_seed(0))
        _sync(estimator.device)
        reference = time.perf_counter() - clock
        if index >= 2:  # the first calls warm caches and allocators
            ours.append(mine)
            theirs.append(reference)
            stages = result.timings
    return statistics.median(ours), statistics.median(theirs), stages


def backend_table(model, frame, settings, repeats):
    """
    Print median CPU seconds per call of the onnxruntime backend against the torch backend.

    The model is exported to a temporary folder first; both run on the CPU with the same
    threads (onnxruntime takes torch's thread count), calls interleaved.

    :param settings: (steps, ensemble, resolution) rows
    """
    from marigold_model.onnx_export import export_onnx
    with tempfile.TemporaryDirectory(prefix='bench_onnx_') as folder:
        export = export_onnx(model, f'{folder}/onnx')
        sides = [DepthEstimator(EstimatorConfig(ModelConfig(model=name, device='cpu',
                                                            backend=backend)))
                 for name, backend in ((model, 'torch'), (str(export), 'onnxruntime'))]
        print(f'\nbackends on the CPU ({torch.get_num_threads()} threads), input '
              f'{frame.shape[1]}x{frame.shape[0]}, {repeats} interleaved calls each\n')
        print('| steps | ensemble | resolution | torch ms | onnxruntime ms | ratio |')
        print('|---|---|---|---|---|---|')
        for steps, members, resolution in settings:
            inference = InferenceConfig(denoising_steps=steps, ensemble_size=members,
                                        processing_resolution=resolution)
            times = [[], []]
            for side in sides:
                side.set_inference(inference)
            for index in range(repeats + 2):
                for side, spent in zip(sides, times):
                    clock = time.perf_counter()
                    side.estimate(frame)
                    if index >= 2:  # the first calls warm caches and allocators
                        spent.append(time.perf_counter() - clock)
            ours, theirs = (statistics.median(t) for t in times)
            used = sides[0].resolved_settings(inference)[1]
            print(f'| {steps} | {members} | {used} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | '
                  f'{theirs / ours:.2f} |')


def flicker(estimator, frames, warm_strength):
    """
    Mean absolute frame-to-frame change of depth on a static noisy sequence.

    Each frame gets its own seed, as a live stream would; warm start re-noises the previous
    frame's latent instead of starting from pure noise.

    :param frames: list of uint8 images of a static scene (sensor noise only)
    :param warm_strength: 0 for independent frames
    """
    estimator.reset_warm_start()
    base = estimator.inference
    depths = []
    for seed, frame in enumerate(frames):
        estimator.set_inference(replace(base, seed=seed, warm_start_strength=warm_strength))
        depths.append(estimator.estimate([frame], keys=['camera'])[0].depth)
    estimator.set_inference(base)
    return float(np.mean([np.abs(a - b).mean() for a, b in zip(depths, depths[1:])]))


def main(argv=None):
    """Run the benchmark and print a report."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--width', type=int, default=640)
    args = parser.parse_args(argv)
    model = _model_name(args.model)
    torch.manual_seed(0)
    estimator = DepthEstimator(EstimatorConfig(ModelConfig(model=model, device=args.device)))
    pipe = _pipeline(model, estimator.device, estimator.dtype)
    frame = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), np.uint8)
    print(f'model {model} on {estimator.device} ({estimator.dtype}), input '
          f'{args.width}x{args.height}, {args.repeats} interleaved calls each\n')
    print('| steps | ensemble | resolution | ours ms | diffusers ms | ratio | encode | unet/step'
          ' | decode | ensemble |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    settings = [(1, 1, 0), (4, 1, 0), (1, 5, 0), (1, 1, 256)]
    for steps, members, resolution in settings:
        inference = InferenceConfig(denoising_steps=steps, ensemble_size=members,
                                    processing_resolution=resolution)
        ours, theirs, stages = compare(estimator, pipe, frame, inference, args.repeats)
        used = estimator.resolved_settings(inference)[1]
        print(f'| {steps} | {members} | {used} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | '
              f'{ours / theirs:.2f} | {stages["encode"] * 1e3:.1f} | '
              f'{stages["unet_per_step"] * 1e3:.1f} | {stages["decode"] * 1e3:.1f} | '
              f'{stages["ensemble"] * 1e3:.1f} |')
    if estimator.device.type == 'cuda':
        print(f'\npeak CUDA memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB')
        estimator.set_inference(InferenceConfig(denoising_steps=1))
        clock = time.perf_counter()
        for _ in range(args.repeats):
            estimator.estimate(frame)
        _sync(estimator.device)
        print(f'{args.repeats / (time.perf_counter() - clock):.1f} frames/s at 1 step '
              '(DESIGN.md floor for the full model: RTX 4090 21/50/91 fps at 768/512/384 px)')
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f'\npeak resident memory of this process {peak:.0f} MiB')
    if importlib.util.find_spec('onnxruntime') is not None:
        backend_table(model, frame, settings, args.repeats)

    from marigold_model.data.synthetic import render_sequence, SceneConfig
    sequence = render_sequence(np.random.default_rng(4), 8, SceneConfig(), 120, 160,
                               motion='static', noise=True)
    frames = [sample.rgb for sample in sequence]
    estimator.set_inference(InferenceConfig(denoising_steps=2))
    independent = flicker(estimator, frames, 0.0)
    warm = flicker(estimator, frames, 0.5)
    print(f'\nflicker on a static noisy sequence (mean |d_t - d_t-1|, 2 steps): independent '
          f'frames {independent:.4f}, warm start 0.5 {warm:.4f} '
          f'(ratio {warm / max(independent, 1e-12):.2f})')


if __name__ == '__main__':
    main()
