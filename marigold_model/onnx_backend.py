"""
ONNX Runtime backend: the networks of a marigold-export-onnx folder as inference sessions.

The estimator keeps its torch loop (DDIM update, batching, ensembling, warm start) on CPU
tensors; only the three network calls go to ONNX Runtime, whose execution providers are
tried in the order TensorRT, CUDA, CPU, the installed ones only (``onnxruntime`` has the CPU
one; ``onnxruntime-gpu`` and the Jetson wheels add CUDA and TensorRT). TensorRT builds an
engine per input shape, slowly for the full model, so engines are kept in a cache folder.
"""

from dataclasses import dataclass
import json
from pathlib import Path

import numpy as np
import torch

from .loading import _scheduler_class, CACHE_DIR, resolve_model_path, WeightsNotFoundError
from .onnx_export import FORMAT_VERSION, MANIFEST

PROVIDER_ORDER = ('TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider')
GPU_PROVIDERS = PROVIDER_ORDER[:2]
_NUMPY_TYPES = {'tensor(float)': np.float32, 'tensor(float16)': np.float16}


def choose_providers(device, available, tensorrt_cache, fp16):
    """
    Choose the execution providers (with options) for a device setting, best first.

    :param device: ModelConfig.device: 'cpu' (CPU only), 'auto' (every installed one) or
        'cuda' / 'cuda:N' (TensorRT or CUDA required)
    :param available: names from onnxruntime.get_available_providers()
    :return: list of (name, options) for InferenceSession(providers=...)
    """
    if device == 'cpu':
        names = ['CPUExecutionProvider']
    else:
        names = [name for name in PROVIDER_ORDER if name in available]
        if device != 'auto' and not set(names) & set(GPU_PROVIDERS):
            raise ValueError(
                f'device {device!r} requested but this ONNX Runtime has no GPU execution '
                f'provider (available: {", ".join(available)}); install onnxruntime-gpu (or '
                "the Jetson wheel) or use device 'cpu' or 'auto'")
    device_id = int(device.split(':')[1]) if device.startswith('cuda:') else 0
    options = {
        'TensorrtExecutionProvider': {
            'device_id': device_id, 'trt_fp16_enable': bool(fp16),
            'trt_engine_cache_enable': True, 'trt_engine_cache_path': str(tensorrt_cache),
            'trt_timing_cache_enable': True, 'trt_timing_cache_path': str(tensorrt_cache)},
        'CUDAExecutionProvider': {'device_id': device_id},
        'CPUExecutionProvider': {},
    }
    return [(name, options[name]) for name in names]


def read_manifest(model):
    """
    Find the export folder a model setting names and read its manifest.

    :return: (Path of the folder, manifest dict)
    :raises WeightsNotFoundError: the folder is missing or is not an export, saying how to
        make one
    """
    folder = Path(model).expanduser()
    if not (folder / MANIFEST).is_file():
        try:
            source = resolve_model_path(model)
        except (WeightsNotFoundError, ValueError):
            source = None
        what = (f'{source} is a diffusers model, not an ONNX export' if source is not None
                else f'{model!r} is not an ONNX export folder (no {MANIFEST})')
        raise WeightsNotFoundError(
            f"backend 'onnxruntime' loads a folder written by marigold-export-onnx; {what}. "
            f'Export it once (marigold-export-onnx {model} OUTDIR) and set model to OUTDIR, '
            "or use backend 'torch'")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get('format') != 'marigold_onnx' or manifest.get('version') != FORMAT_VERSION:
        raise WeightsNotFoundError(
            f'{folder / MANIFEST} is not a marigold_onnx manifest of version {FORMAT_VERSION}; '
            'export the model again with this version of marigold-export-onnx')
    return folder, manifest


class OnnxRuntimeNetworks:
    """
    Encode, U-Net and decode as ONNX Runtime sessions, taking and giving torch tensors.

    Inputs are cast to the exported dtype and outputs returned as float32 CPU tensors. A
    fixed-shape export runs any batch: it is split into, or padded up to, the exported one.

    :param providers: list of (name, options), see :func:`choose_providers`
    :param threads: CPU threads per session (0: ONNX Runtime's choice)
    """

    name = 'onnxruntime'

    def __init__(self, folder, manifest, providers, threads=0):
        """Open the three sessions."""
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # warnings about provider node placement are noise
        self.sessions = {
            name: ort.InferenceSession(str(Path(folder) / entry['file']), options,
                                       providers=providers)
            for name, entry in manifest['networks'].items()}
        self.providers = self.sessions['unet'].get_providers()
        self.vae_scale_factor = int(manifest['vae_scale_factor'])
        static = manifest.get('static')
        self.static_batch = static['batch'] if static else None
        self._inputs = {name: [(i.name, _NUMPY_TYPES[i.type]) for i in session.get_inputs()]
                        for name, session in self.sessions.items()}
        self._fixed = {name: session.get_inputs()[0].shape[1:]
                       for name, session in self.sessions.items()} if static else {}
        self._static = static

    def _run(self, name, tensor, *constants):
        """Run one network on a batch; ``constants`` are the inputs after the first."""
        (first, dtype), *rest = self._inputs[name]
        array = tensor.detach().cpu().numpy().astype(dtype, copy=False)
        if name in self._fixed and list(array.shape[1:]) != list(self._fixed[name]):
            height, width = self._static['frame_size']
            raise ValueError(
                f'this ONNX export has fixed shapes (frames of {width}x{height} at '
                f'processing size {self._static["image_size"]}); {name} got '
                f'{list(array.shape)}: export again for this frame size and resolution, or '
                'without --static-size')
        feeds = {key: np.asarray(value, kind) for (key, kind), value in zip(rest, constants)}
        size = self.static_batch or array.shape[0]
        outputs = []
        for start in range(0, array.shape[0], size):
            part = array[start:start + size]
            rows = part.shape[0]
            if rows < size:  # a fixed batch: repeat the last row, drop its results
                part = np.concatenate([part, np.repeat(part[-1:], size - rows, axis=0)])
            feeds[first] = np.ascontiguousarray(part)
            outputs.append(self.sessions[name].run(None, feeds)[0][:rows])
        result = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        return torch.from_numpy(result.astype(np.float32, copy=False))

    def encode(self, images):
        """Encode [B, 3, H, W] images in [-1, 1] into scaled latents."""
        return self._run('vae_encoder', images)

    def unet(self, sample, timestep):
        """Run the U-Net on [B, 2C, h, w] latents at a timestep (0-d tensor)."""
        return self._run('unet', sample, [float(timestep)])

    def decode(self, latent):
        """Decode scaled depth latents into [B, 1, H, W] depth in [0, 1]."""
        return self._run('vae_decoder', latent)


@dataclass
class OnnxComponents:
    """
    What DepthEstimator needs of an exported model.

    :param pipeline_config: model_index.json entries with the export's defaults
    :param manifest: marigold_onnx.json
    """

    networks: object
    scheduler: object
    pipeline_config: dict
    path: Path
    manifest: dict


def load_onnx_components(config):
    """Open an exported model with the execution providers a ModelConfig allows."""
    import onnxruntime as ort
    folder, manifest = read_manifest(config.model)
    if manifest['vae'] != config.vae:
        raise ValueError(
            f"{folder} was exported with vae {manifest['vae']!r} but the settings ask for "
            f'{config.vae!r}; export again with --vae {config.vae} or change vae')
    fp16 = manifest['dtype'] == 'float16'
    if config.dtype == 'bfloat16' or (fp16 and config.dtype == 'float32'):
        raise ValueError(f"{folder} was exported in {manifest['dtype']}; dtype "
                         f"{config.dtype!r} is not available with backend 'onnxruntime' "
                         "(use 'auto', or export again)")
    # 'auto' means float16 on GPUs, as with torch: TensorRT may build float16 engines
    # from a float32 export; the CUDA and CPU providers run the exported dtype.
    cache = Path(config.tensorrt_cache or CACHE_DIR / 'tensorrt').expanduser()
    available = ort.get_available_providers()
    providers = choose_providers(config.device, available, cache,
                                 fp16 or config.dtype in ('auto', 'float16'))
    if providers[0][0] == 'TensorrtExecutionProvider':
        cache.mkdir(parents=True, exist_ok=True)
    networks = OnnxRuntimeNetworks(folder, manifest, providers, torch.get_num_threads())
    scheduler = _scheduler_class(folder, str(folder)).from_pretrained(folder,
                                                                      subfolder='scheduler')
    return OnnxComponents(networks, scheduler, manifest['pipeline_config'], folder, manifest)
