"""
Speed of the full-size Marigold v1-1 architecture on a GPU, with random weights.

Nothing is downloaded: the Marigold v1-1 architecture (SD2 U-Net with 8 input channels, SD
VAE) and a TAESD tiny VAE get random weights (which cost the same time as trained ones), are
written as an fp16 model folder and loaded through DepthEstimator, the path users take.  The
Markdown table gives, per speed setting, size and step count: frames per second, ms per
stage, peak memory and the fraction of the FLOP floor (DESIGN.md "Speed: the physical
floor")::

    python bench/gpu.py [--peak-tflops 800] [--repeats 5] [--variants eager,compile]
    python bench/gpu.py --smoke     # tiny architecture on the CPU in fp32 (the tests)

The ``torch.compile`` row limits GEMM and convolution autotuning to ATen kernels unless
``--autotune`` (full autotuning of the SD U-Net takes longer than the whole run).

The ONNX Runtime rows export the same random model with marigold-export-onnx's function and
run it through DepthEstimator with ``backend: onnxruntime``: CUDA from an fp16 export with
dynamic shapes, TensorRT from an fp16 export with fixed shapes per frame size (fp16 engines;
the fp16 U-Net, 1.7 GB, stays in one file below protobuf's 2 GB) with its engines cached in
the model folder (``--folder`` keeps exports and engines for the next run; the first engine
build takes minutes).  Exports are traced on the CPU (tens of seconds at full size).  A row
whose execution provider is not installed, or did not start, says so in the table.
``--smoke`` runs the CPU provider on a float32 export of the tiny model instead.
"""

import argparse
from dataclasses import dataclass
import gc
import math
from pathlib import Path
import resource
import shutil
import statistics
import sys
import tempfile
import time

from marigold_model.architecture import build_unet, build_vae, save_marigold, TinyArchitecture
from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_model.estimator import DepthEstimator
import numpy as np
import torch

#: GFLOP per forward (DESIGN.md, "Speed: the physical floor"), by (width, height).
FLOOR_GFLOP = {
    (768, 576): {'sd_encode': 1924, 'unet': 1487, 'sd_decode': 4283,
                 'tiny_encode': 206, 'tiny_decode': 239},
    (512, 384): {'sd_encode': 831, 'unet': 575, 'sd_decode': 1879,
                 'tiny_encode': 92, 'tiny_decode': 106},
}
DEFAULT_PEAK_TFLOPS = 800.0  # H100 dense fp16 tensor cores
SIZES = ((512, 384), (768, 576))
SMOKE_SIZES = ((64, 48), (96, 64))
STEPS = (1, 4)
# Marigold v1-1's published defaults (model_index.json).
MARIGOLD_STEPS, MARIGOLD_RESOLUTION = 4, 768


@dataclass(frozen=True)
class Variant:
    """One speed setting: the ModelConfig switches it turns on."""

    key: str
    label: str
    channels_last: bool = True
    compile: bool = False  # noqa: A003 - ModelConfig's name
    cuda_graphs: bool = False
    tiny_vae: bool = False
    warmup: int = 2
    # ONNX Runtime rows: the execution provider tried first (the ones after it in
    # marigold_model.onnx_backend.PROVIDER_ORDER take the nodes it cannot), and whether the
    # export has fixed shapes (one per frame size).
    provider: str = ''
    static: bool = False


#: Table order.  compile and CUDA graphs warm up longer: compilation, graph recording.
VARIANTS = (
    Variant('eager', 'eager', channels_last=False),
    Variant('channels_last', 'channels_last'),
    Variant('compile', 'torch.compile', compile=True, warmup=3),
    Variant('graphs', 'CUDA graphs', cuda_graphs=True, warmup=3),
    Variant('tiny', 'tiny VAE (TAESD)', tiny_vae=True),
    Variant('ort_cpu', 'onnxruntime CPU', provider='CPUExecutionProvider', warmup=1),
    Variant('ort_cuda', 'onnxruntime CUDA', provider='CUDAExecutionProvider'),
    Variant('ort_trt', 'onnxruntime TensorRT', provider='TensorrtExecutionProvider',
            static=True),
)
#: Run order: the cheap ones first, so a run cut short has them.  TensorRT last: its first
#: engine build per size takes minutes (run it alone, with --folder to keep the engines).
RUN_ORDER = ('eager', 'channels_last', 'tiny', 'ort_cpu', 'ort_cuda', 'compile', 'graphs',
             'ort_trt')
ONNX_PACKAGES = 'onnxruntime-gpu, or the Jetson wheel'

COLUMNS = ('variant', 'size', 'steps', 'FPS', 'encode ms', 'U-Net ms', 'decode ms',
           'total ms', 'peak MiB', 'GFLOP', '% of floor')


# ------------------------------------------------------------------ the architecture


def build_sd2_unet():
    """Return a random U-Net of stabilityai/stable-diffusion-2 with Marigold's 8 input channels."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=96, in_channels=8, out_channels=4, center_input_sample=False,
        flip_sin_to_cos=True, freq_shift=0,
        down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
        up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
        mid_block_scale_factor=1, act_fn='silu', norm_num_groups=32, norm_eps=1e-5,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True)


def build_sd_vae():
    """Return a random float32 CPU AutoencoderKL of Stable Diffusion (x8, 4 latent channels)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn='silu',
        norm_num_groups=32, sample_size=768, scaling_factor=0.18215)


def build_tiny_vae(smoke=False):
    """Return a random AutoencoderTiny (TAESD; a few channels only with ``smoke``)."""
    from diffusers import AutoencoderTiny
    if smoke:
        return AutoencoderTiny(encoder_block_out_channels=(16,) * 4,
                               decoder_block_out_channels=(16,) * 4,
                               num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)
    return AutoencoderTiny()


SMOKE_ARCH = TinyArchitecture(vae_channels=(16, 16, 16, 16), unet_channels=(32, 64),
                              text_dim=32, processing_resolution=64, denoising_steps=1)


def write_models(folder, smoke=False, device='cpu'):
    """Write (or keep) ``folder``/marigold and /taesd, weights drawn on ``device``; return both."""
    with torch.device(device):
        return _write_models(Path(folder), smoke)


def _write_models(folder, smoke):
    model, tiny = folder / 'marigold', folder / 'taesd'
    torch.manual_seed(0)
    if not (model / 'model_index.json').is_file():
        if smoke:
            unet, vae = build_unet(SMOKE_ARCH), build_vae(SMOKE_ARCH)
            embedding = torch.randn(1, SMOKE_ARCH.text_tokens, SMOKE_ARCH.text_dim)
            steps, resolution = 1, 64
        else:
            unet, vae = build_sd2_unet(), build_sd_vae()
            embedding = torch.randn(1, 2, 1024)  # CLIP-H of '' unpadded: BOS and EOS
            steps, resolution = MARIGOLD_STEPS, MARIGOLD_RESOLUTION
        save_marigold(model, unet, vae, embedding, steps, resolution, fp16=not smoke,
                      extra={'random': 'bench/gpu.py: speed only, meaningless depth'})
        del unet, vae
    if not (tiny / 'config.json').is_file():
        vae = build_tiny_vae(smoke)
        vae.to(torch.float32 if smoke else torch.float16).save_pretrained(tiny)
    return str(model), str(tiny)


# ------------------------------------------------------------------ FLOPs


def counted_gflop(estimator, width, height):
    """
    Count GFLOP per forward of encoder, U-Net and decoder at a size (torch's FLOP counter).

    Used for sizes the DESIGN table lacks (the smoke run) and to cross-check it.

    :param estimator: an eager DepthEstimator
    :return: dict with 'encode', 'unet', 'decode'
    """
    from torch.utils.flop_counter import FlopCounterMode
    factor = estimator.vae_scale_factor
    padded = (1, 3, -(-height // factor) * factor, -(-width // factor) * factor)
    images = torch.zeros(padded, device=estimator.device, dtype=estimator.dtype)
    counts = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            latent = estimator.encode(images)
        counts['encode'] = counter.get_total_flops() / 1e9
        model_input = torch.cat([latent, latent], dim=1)
        step = torch.tensor(999, device=estimator.device)
        with FlopCounterMode(display=False) as counter:
            estimator.networks.unet(model_input, step)
        counts['unet'] = counter.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as counter:
            estimator.decode(latent)
        counts['decode'] = counter.get_total_flops() / 1e9
    return counts


def floor_gflop(size, tiny, counted=None):
    """
    GFLOP per forward of each stage: the DESIGN figures, else the counted ones.

    :param size: (width, height)
    :param counted: counted_gflop() of this size and VAE, used when the table lacks the size
    :return: (dict with 'encode', 'unet', 'decode', source name)
    """
    table = FLOOR_GFLOP.get(tuple(size))
    if table is None:
        return counted, 'counted'
    vae = 'tiny' if tiny else 'sd'
    return {'encode': table[f'{vae}_encode'], 'unet': table['unet'],
            'decode': table[f'{vae}_decode']}, 'DESIGN.md'


# ------------------------------------------------------------------ timing


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_memory_mib(device):
    """Return peak MiB since the last reset: GPU memory on CUDA, else the process' peak RSS."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_memory_in_use_mib(device):
    """Return MiB in use on a CUDA device by every allocator (ONNX Runtime's is not torch's)."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return (total - free) / 2 ** 20


def measure(estimator, frame, steps, warmup, repeats, memory=None):
    """
    Time one setting: warm-up calls, then medians of timed calls.

    :param warmup: untimed calls first (compilation, graph recording, allocator)
    :param memory: function returning the MiB figure (default :func:`peak_memory_mib`)
    :return: dict of medians: 'total', 'encode', 'unet', 'decode' (seconds), 'peak_mib'
    """
    estimator.set_inference(InferenceConfig(denoising_steps=steps, ensemble_size=1,
                                            processing_resolution=-1, batch_size=1))
    for _ in range(warmup):
        estimator.estimate(frame)
    _sync(estimator.device)
    if estimator.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(estimator.device)
    samples = {'total': [], 'encode': [], 'unet': [], 'decode': []}
    for _ in range(repeats):
        clock = time.perf_counter()
        result = estimator.estimate(frame)
        _sync(estimator.device)
        samples['total'].append(time.perf_counter() - clock)
        for stage in ('encode', 'unet', 'decode'):
            samples[stage].append(result.timings[stage])
    medians = {name: statistics.median(values) for name, values in samples.items()}
    medians['peak_mib'] = memory() if memory else peak_memory_mib(estimator.device)
    return medians


def row(variant, size, steps, medians, gflop, peak_tflops, dtype_name):
    """Return one table row: str cells in COLUMNS order."""
    frame_gflop = gflop['encode'] + steps * gflop['unet'] + gflop['decode']
    fps = 1.0 / medians['total']
    floor = 100.0 * fps * frame_gflop / (peak_tflops * 1e3)
    label = f'{dtype_name} eager' if variant.key == 'eager' else variant.label
    return [label, f'{size[0]}x{size[1]}', str(steps), f'{fps:.2f}',
            f'{1e3 * medians["encode"]:.2f}', f'{1e3 * medians["unet"]:.2f}',
            f'{1e3 * medians["decode"]:.2f}', f'{1e3 * medians["total"]:.2f}',
            f'{medians["peak_mib"]:.0f}', f'{frame_gflop:.4g}', f'{floor:.3g}']


def skipped_row(variant, reason):
    """Return the table row of a variant that was not run, saying why."""
    return [variant.label, '-', '-', f'skipped: {reason}'] + ['-'] * (len(COLUMNS) - 4)


def skip_reason(variant, smoke, available=None):
    """
    Tell why an ONNX Runtime variant cannot run here, or None when it can (or is torch's).

    :param available: execution provider names (default: onnxruntime.get_available_providers())
    """
    if not variant.provider:
        return None
    if available is None:
        try:
            import onnxruntime
        except ImportError:
            return f'onnxruntime is not installed ({ONNX_PACKAGES} for GPUs)'
        available = onnxruntime.get_available_providers()
    if variant.provider not in available:
        return (f'{variant.provider} is not installed in this ONNX Runtime (it has '
                f'{", ".join(available)}; install {ONNX_PACKAGES})')
    cpu = variant.provider == 'CPUExecutionProvider'
    if smoke and not cpu:
        return '--smoke runs on the CPU'
    if cpu and not smoke:
        return 'the full-size model takes tens of seconds a frame on a CPU (--smoke runs it)'
    return None


def onnx_export(folder, model, variant, size, smoke):
    """
    Export the random model for an ONNX Runtime variant, or reuse the export in ``folder``.

    :param size: (width, height) of the frames: fixed shapes of a static variant
    :return: Path of the export
    """
    from marigold_model.onnx_export import export_onnx, MANIFEST
    fp16 = not smoke  # CPU ONNX Runtime lacks many float16 kernels
    name = 'onnx_fp16' if fp16 else 'onnx_fp32'
    options = {'fp16': fp16}
    if variant.static:  # processed at the frame size, as measure() asks
        name += f'_{size[0]}x{size[1]}'
        options.update(static_size=(size[1], size[0]), resolution=max(size))
    out = Path(folder) / name
    if not (out / MANIFEST).is_file():
        export_onnx(model, out, **options)
    return out


def onnx_estimator(export, variant, device, dtype, cache):
    """
    Load an export with the variant's execution provider first, through DepthEstimator.

    The backend would take the best installed provider (TensorRT before CUDA); here the
    providers are those from the variant's on in marigold_model.onnx_backend's order.
    """
    from marigold_model.loading import _scheduler_class
    from marigold_model.onnx_backend import choose_providers, OnnxComponents
    from marigold_model.onnx_backend import OnnxRuntimeNetworks, PROVIDER_ORDER, read_manifest
    import onnxruntime
    config = EstimatorConfig(ModelConfig(model=str(export), device=device, dtype=dtype,
                                         backend='onnxruntime', tensorrt_cache=str(cache)))
    folder, manifest = read_manifest(config.model.model)
    names = PROVIDER_ORDER[PROVIDER_ORDER.index(variant.provider):]
    installed = [n for n in names if n in onnxruntime.get_available_providers()]
    providers = choose_providers(device, installed, cache, True)
    if variant.provider == 'TensorrtExecutionProvider':
        Path(cache).mkdir(parents=True, exist_ok=True)
    networks = OnnxRuntimeNetworks(folder, manifest, providers, torch.get_num_threads())
    scheduler = _scheduler_class(folder, str(folder)).from_pretrained(folder,
                                                                      subfolder='scheduler')
    return DepthEstimator(config, OnnxComponents(networks, scheduler,
                                                 manifest['pipeline_config'], folder, manifest))


def load_variant(variant, model, tiny, device, dtype, folder, size, smoke):
    """
    Load the estimator of a variant (exporting first for ONNX Runtime).

    :return: (DepthEstimator, note on what loading took)
    """
    clock = time.perf_counter()
    if not variant.provider:
        estimator = DepthEstimator(EstimatorConfig(ModelConfig(
            model=model, device=device, dtype=dtype,
            vae='tiny' if variant.tiny_vae else 'model', tiny_vae=tiny,
            channels_last=variant.channels_last, compile=variant.compile,
            cuda_graphs=variant.cuda_graphs)))
        return estimator, f'loaded in {time.perf_counter() - clock:.1f} s'
    export = onnx_export(folder, model, variant, size, smoke)
    exported = time.perf_counter() - clock
    try:
        estimator = onnx_estimator(export, variant, device, dtype, Path(folder) / 'tensorrt')
    except Exception as error:  # ONNX Runtime's errors are not RuntimeErrors
        raise RuntimeError(f'{variant.provider} failed to start: '
                           f'{str(error).splitlines()[0][:200]}') from error
    note = (f'exported (or reused) in {exported:.1f} s, sessions opened in '
            f'{time.perf_counter() - clock - exported:.1f} s, providers '
            f'{", ".join(estimator.networks.providers)}')
    if estimator.networks.providers[0] != variant.provider:
        raise RuntimeError(f'{variant.provider} did not start ({note})')
    return estimator, note


def markdown(rows):
    """Format rows (lists of cells) as a Markdown table."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    lines += ['| ' + ' | '.join(cells) + ' |' for cells in rows]
    return '\n'.join(lines)


def _release():
    """Free what the last variant held before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch._dynamo.reset()  # compiled graphs and CUDA graph pools of the last variant
        torch.cuda.empty_cache()


def _torch_twin(model, device, dtype):
    """Load the torch estimator of the model, to count the FLOPs of ONNX Runtime's networks."""
    return DepthEstimator(EstimatorConfig(ModelConfig(model=model, device=device, dtype=dtype,
                                                      channels_last=False)))


def _over_budget(args, started, notes, what, key):
    """Tell whether the time budget is spent, noting what is left out and how to run it."""
    elapsed = time.perf_counter() - started
    if not args.budget_s or elapsed <= args.budget_s:
        return False
    notes.append(f'{what}: not run, {elapsed:.0f} s spent of the {args.budget_s:.0f} s '
                 f'budget (run it alone: --variants {key})')
    return True


def run(args):
    """Build, load and time every variant; print the table and return its rows."""
    device = 'cpu' if args.smoke else args.device
    dtype = 'float32' if args.smoke else 'float16'
    dtype_name = 'fp32' if args.smoke else 'fp16'
    sizes = SMOKE_SIZES if args.smoke else args.sizes
    wanted = [v for v in VARIANTS if v.key in args.variants]
    if not args.autotune:
        import torch._inductor.config as inductor
        inductor.max_autotune_gemm_backends = 'ATEN'
        inductor.max_autotune_conv_backends = 'ATEN'
    folder = args.folder or tempfile.mkdtemp(prefix='bench_gpu_')
    started = time.perf_counter()
    rows, counted, notes, skipped, failed = {}, {}, [], {}, {}
    try:
        clock = time.perf_counter()
        model, tiny = write_models(folder, args.smoke, device)
        _release()  # the float32 originals drawn on the GPU
        notes.append(f'model folder written in {time.perf_counter() - clock:.1f} s')
        rng = np.random.default_rng(0)
        frames = {size: rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                  for size in sizes}
        for key in RUN_ORDER:
            variant = next((v for v in wanted if v.key == key), None)
            if variant is None:
                continue
            reason = skip_reason(variant, args.smoke)
            if reason is not None:
                skipped[variant.key] = skipped_row(variant, reason)
                continue
            if _over_budget(args, started, notes, variant.label, variant.key):
                continue
            estimator, loaded_for = None, None
            memory = None
            if variant.provider and device != 'cpu':
                memory = lambda: device_memory_in_use_mib(device)  # noqa: E731
            for size in sizes:
                if variant.key in failed:
                    break
                if _over_budget(args, started, notes, f'{variant.label} {size[0]}x{size[1]}',
                                variant.key):
                    continue
                if loaded_for != (size if variant.static else 'any'):
                    estimator = None  # a fixed-shape export per size: free the last one
                    _release()
                    try:
                        estimator, note = load_variant(variant, model, tiny, device, dtype,
                                                       folder, size, args.smoke)
                    except RuntimeError as error:  # a provider that failed to start
                        failed[variant.key] = str(error)
                        break
                    loaded_for = size if variant.static else 'any'
                    notes.append(f'{variant.label}' + (f' {size[0]}x{size[1]}' if
                                                       variant.static else '') + f': {note}')
                vae_kind = 'tiny' if variant.tiny_vae else 'sd'
                if (size, vae_kind) not in counted and (
                        not variant.provider or size not in FLOOR_GFLOP):
                    # The eager torch modules (estimator.unet is never the compiled wrapper;
                    # ONNX Runtime's sessions are not counted: a torch twin is).
                    counted[(size, vae_kind)] = counted_gflop(
                        estimator if not variant.provider else
                        _torch_twin(model, device, dtype), *size)
                gflop, source = floor_gflop(size, variant.tiny_vae,
                                            counted.get((size, vae_kind)))
                for steps in STEPS:
                    clock = time.perf_counter()
                    try:
                        medians = measure(estimator, frames[size], steps,
                                          variant.warmup + args.warmup, args.repeats, memory)
                    except Exception as error:
                        if not variant.provider:
                            raise
                        # TensorRT builds its engines in the first call
                        failed[variant.key] = (f'failed at {size[0]}x{size[1]}: '
                                               f'{str(error).splitlines()[0][:200]}')
                        break
                    rows[(variant.key, size, steps)] = row(
                        variant, size, steps, medians, gflop, args.peak_tflops, dtype_name)
                    print(f'{variant.label} {size[0]}x{size[1]} {steps} step(s): '
                          f'{time.perf_counter() - clock:.1f} s (GFLOP: {source})',
                          file=sys.stderr, flush=True)
            if variant.key in failed:  # a row of its own, or a note below the rows that ran
                if any(k[0] == variant.key for k in rows):
                    notes.append(f'{variant.label}: {failed[variant.key]}')
                else:
                    skipped[variant.key] = skipped_row(variant, failed[variant.key])
            del estimator
            _release()
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    for (size, vae_kind), figures in sorted(counted.items()):
        table = FLOOR_GFLOP.get(size)
        if table is not None:
            notes.append(f'counted GFLOP {size[0]}x{size[1]} ({vae_kind} VAE): encode '
                         f'{figures["encode"]:.0f} (DESIGN {table[vae_kind + "_encode"]}), '
                         f'U-Net {figures["unet"]:.0f} (DESIGN {table["unet"]}), decode '
                         f'{figures["decode"]:.0f} (DESIGN {table[vae_kind + "_decode"]})')
    ordered = []
    for v in wanted:
        ordered += [skipped[v.key]] if v.key in skipped else [
            rows[(v.key, s, n)] for s in sizes for n in STEPS if (v.key, s, n) in rows]
    name = torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'
    print(f'Marigold v1-1 architecture (random weights), {dtype_name}, {name}, ensemble 1, '
          f'batch 1, processed at the frame size; medians of {args.repeats} calls; '
          f'% of floor = FPS x GFLOP / {args.peak_tflops:g} TFLOPS; peak MiB: '
          + ('GPU memory allocated by torch (onnxruntime rows: device memory in use after '
             'the calls)' if device != 'cpu' else 'process peak RSS')
          + (' (speed switches are ignored on the CPU)' if device == 'cpu' else '') + '\n')
    print(markdown(ordered))
    print()
    for note in notes:
        print(f'- {note}')
    print(f'- total {time.perf_counter() - started:.0f} s')
    return ordered


def _size(text):
    width, height = (int(v) for v in text.lower().split('x'))
    return width, height


def parse_args(argv=None):
    """Read the command line (default sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--smoke', action='store_true',
                        help='tiny architecture on the CPU in fp32 (for the tests)')
    parser.add_argument('--device', default='cuda', help='device of the full-size run')
    parser.add_argument('--peak-tflops', type=float, default=DEFAULT_PEAK_TFLOPS,
                        help='dense fp16 peak of the device (H100 about 800)')
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per row')
    parser.add_argument('--warmup', type=int, default=0,
                        help='extra untimed calls per row (each variant has its own)')
    parser.add_argument('--sizes', type=lambda t: tuple(_size(s) for s in t.split(',')),
                        default=SIZES, help='WxH[,WxH...] (default 512x384,768x576)')
    parser.add_argument('--variants', type=lambda t: tuple(t.split(',')),
                        default=tuple(v.key for v in VARIANTS),
                        help='comma-separated subset of ' + ','.join(v.key for v in VARIANTS))
    parser.add_argument('--budget-s', type=float, default=230.0,
                        help='start no new variant or size after this many seconds (0: no '
                        'limit); compiled variants compile once per size')
    parser.add_argument('--autotune', action='store_true',
                        help='full GEMM / convolution autotuning for torch.compile (slow)')
    parser.add_argument('--folder', default='',
                        help='keep the random model folder here and reuse it next time')
    args = parser.parse_args(argv)
    unknown = set(args.variants) - {v.key for v in VARIANTS}
    if unknown:
        parser.error(f'unknown variants {sorted(unknown)}')
    if args.repeats < 1 or not math.isfinite(args.peak_tflops) or args.peak_tflops <= 0:
        parser.error('--repeats must be >= 1 and --peak-tflops positive')
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    return args


def main(argv=None):
    """Run the benchmark from the command line."""
    args = parse_args(argv)
    if not args.smoke and not args.device.startswith('cuda'):
        print('bench/gpu.py: the full-size run needs a GPU (a frame takes tens of seconds '
              'on a CPU); use --smoke to check the script here', file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
