"""
Export a Marigold model to ONNX for ONNX Runtime (CPU, CUDA, TensorRT) and trtexec.

Writes three networks, the same modules the torch backend calls (marigold_model.networks):

* ``vae_encoder.onnx``: image [B, 3, H, W] in [-1, 1] -> scaled latent [B, C, H/f, W/f]
* ``unet.onnx``: sample [B, 2C, h, w] (image and depth latents), timestep [1] float32 ->
  prediction [B, C, h, w]; the empty-prompt embedding is a constant inside the graph
* ``vae_decoder.onnx``: depth latent [B, C, h, w] -> depth [B, 1, H, W] in [0, 1]

plus ``scheduler/scheduler_config.json`` and the manifest ``marigold_onnx.json``.  Batch,
height and width are dynamic unless ``--static-size`` fixes them.  A network over
``EXTERNAL_DATA_BYTES`` keeps its weights in ``NAME.onnx.data`` (protobuf's 2 GB limit).

    marigold-export-onnx prs-eth/marigold-depth-v1-1 marigold-onnx [--fp16]
        [--resolution 768] [--static-size 640x480 --batch 1] [--vae tiny]
"""

import argparse
import json
from pathlib import Path
import shutil
import tempfile
import warnings

import torch

MANIFEST = 'marigold_onnx.json'
FORMAT_VERSION = 1
OPSET = 17  # TensorRT 8.5 (JetPack 5) parses opset 17; LayerNorm-free graphs need no more
EXTERNAL_DATA_BYTES = 1900 * 2 ** 20
NETWORK_FILES = {'vae_encoder': 'vae_encoder.onnx', 'unet': 'unet.onnx',
                 'vae_decoder': 'vae_decoder.onnx'}


def parse_size(text):
    """Return (height, width) of a frame size written WIDTHxHEIGHT, e.g. '640x480'."""
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError as error:
        raise ValueError(f'size {text!r} is not WIDTHxHEIGHT (e.g. 640x480)') from error
    if width < 1 or height < 1:
        raise ValueError(f'size {text!r} must be positive')
    return height, width


def _dummy_latent_size(unet):
    """Return a latent (h, w) to trace the U-Net with: not a multiple of its up factor."""
    # The U-Net passes explicit upsampling sizes only for such sizes; traced with them, the
    # graph upsamples to the skip connection's size and so serves every size.
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    return factor + 1, 2 * factor + 1


def _export(module, inputs, names, outputs, dynamic, path):
    """Trace one module to ONNX (TorchScript exporter: no onnxscript needed)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer warnings about Python-side shape checks
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=outputs, dynamic_axes=dynamic,
                          do_constant_folding=True)


def _finish(exported, final, threshold, output_shape, dynamic_axes):
    """
    Save an exported network under its final name, its weights in a .data file if large.

    :param exported: path the exporter wrote (with any external files beside it)
    :param threshold: weight bytes above which the weights go to ``final``.data
    :param output_shape: the output's shape when traced
    :param dynamic_axes: the output's dynamic axes; the others get the traced sizes (the
        exporter leaves some, e.g. the encoder's latent channels, as symbols)
    :return: name of the external data file, or None
    """
    import onnx
    model = onnx.load(str(exported))
    for axis, dim in enumerate(model.graph.output[0].type.tensor_type.shape.dim):
        if axis not in dynamic_axes:
            dim.dim_value = output_shape[axis]
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    if weights > threshold:
        data = final.name + '.data'
        onnx.save_model(model, str(final), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data, size_threshold=1024)
    else:
        data = None
        onnx.save_model(model, str(final))
    onnx.checker.check_model(str(final))  # by path: works past 2 GB, checks the .data too
    return data


def _describe(path):
    """Describe an ONNX file's inputs and outputs: name -> {shape, dtype} (dims by name)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype
    graph = onnx.load(str(path), load_external_data=False).graph

    def entries(values):
        out = {}
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            out[value.name] = {'shape': shape,
                               'dtype': str(tensor_dtype_to_np_dtype(tensor.elem_type))}
        return out
    return {'inputs': entries(graph.input), 'outputs': entries(graph.output)}


def export_onnx(model, outdir, fp16=False, resolution=0, static_size=None, batch=1,
                vae='model', tiny_vae='madebyollin/taesd',
                external_data_bytes=EXTERNAL_DATA_BYTES):
    """
    Export the networks of a Marigold model to an ONNX folder the onnxruntime backend loads.

    The folder is written beside ``outdir`` and renamed into place when complete; a folder
    at ``outdir`` that is not an export (no manifest) is refused, not overwritten.

    :param model: model name as accepted by marigold_model.loading (hub id, folder, bundled:)
    :param fp16: export the weights and activations in float16 (GPU; CPU ONNX Runtime lacks
        many float16 kernels)
    :param resolution: default processing resolution stored in the manifest (0: the model's)
    :param static_size: (height, width) of the camera frames for fixed shapes, or None for
        dynamic batch, height and width
    :param batch: batch of the fixed shapes (frames x ensemble members per call)
    :param vae: 'model' or 'tiny' (an AutoencoderTiny from ``tiny_vae``)
    :param external_data_bytes: weight bytes above which a network's weights go to a .data file
    :return: Path of the folder
    """
    from .architecture import replace_folder
    from .estimator import FALLBACK_RESOLUTION, FALLBACK_STEPS, processing_size
    from .loading import load_components
    from .networks import DepthDecoder, ImageEncoder, TextFreeUNet, vae_scale_factor
    if vae not in ('model', 'tiny'):
        raise ValueError(f"vae must be 'model' or 'tiny', got {vae!r}")
    if batch < 1:
        raise ValueError('batch must be >= 1')
    outdir = Path(outdir)
    if outdir.exists() and (not outdir.is_dir() or (any(outdir.iterdir())
                                                    and not (outdir / MANIFEST).exists())):
        raise FileExistsError(f'{outdir} exists and is not an ONNX export; not overwriting it '
                              '(choose a new or empty folder)')
    dtype = torch.float16 if fp16 else torch.float32
    parts = load_components(model, torch.device('cpu'), dtype,
                            tiny_vae if vae == 'tiny' else None)
    config = parts.pipeline_config
    steps = config.get('default_denoising_steps') or FALLBACK_STEPS
    resolution = resolution or config.get('default_processing_resolution') or FALLBACK_RESOLUTION
    factor = vae_scale_factor(parts.vae)
    channels = parts.unet.config.out_channels
    modules = {'vae_encoder': ImageEncoder(parts.vae).eval(),
               'unet': TextFreeUNet(parts.unet, parts.empty_text_embedding).eval(),
               'vae_decoder': DepthDecoder(parts.vae).eval()}
    if static_size is None:
        latent = _dummy_latent_size(parts.unet)
        trace_batch = 2  # not 1: a traced batch of 1 can be folded into broadcasts
        image_axes = {0: 'batch', 2: 'height', 3: 'width'}
        latent_axes = {0: 'batch', 2: 'latent_height', 3: 'latent_width'}
    else:
        size = processing_size(*static_size, resolution)
        latent = tuple(-(-s // factor) for s in size)  # the estimator pads to the factor
        trace_batch = batch
        image_axes = latent_axes = {}
    image = (trace_batch, 3, latent[0] * factor, latent[1] * factor)
    sample = torch.randn(trace_batch, 2 * channels, *latent, dtype=dtype)
    timestep = torch.tensor([999.0])
    calls = {'vae_encoder': ((torch.rand(image, dtype=dtype) * 2 - 1,), ['image'], ['latent'],
                             image_axes, latent_axes),
             'unet': ((sample, timestep), ['sample', 'timestep'], ['prediction'],
                      latent_axes, latent_axes),
             'vae_decoder': ((sample[:, channels:],), ['latent'], ['depth'], latent_axes,
                             image_axes)}
    outdir.parent.mkdir(parents=True, exist_ok=True)
    partial = outdir.with_name(f'.{outdir.name}.partial')
    shutil.rmtree(partial, ignore_errors=True)
    networks = {}
    try:
        partial.mkdir()
        parts.scheduler.save_pretrained(partial / 'scheduler')
        for name, (inputs, names, outputs, in_axes, out_axes) in calls.items():
            dynamic = None
            if static_size is None:
                dynamic = {n: in_axes for n in names if n != 'timestep'}
                dynamic.update({n: out_axes for n in outputs})
            with tempfile.TemporaryDirectory(dir=partial) as scratch, torch.inference_mode():
                exported = Path(scratch) / NETWORK_FILES[name]
                _export(modules[name], inputs, names, outputs, dynamic, exported)
                shape = tuple(modules[name](*inputs).shape)
                data = _finish(exported, partial / NETWORK_FILES[name], external_data_bytes,
                               shape, out_axes if static_size is None else {})
            networks[name] = {'file': NETWORK_FILES[name], 'external_data': data,
                              **_describe(partial / NETWORK_FILES[name])}
        manifest = {
            'format': 'marigold_onnx', 'version': FORMAT_VERSION, 'opset': OPSET,
            'source_model': model, 'source_path': str(parts.path),
            'vae': vae, 'tiny_vae': tiny_vae if vae == 'tiny' else None,
            'dtype': 'float16' if fp16 else 'float32',
            'latent_channels': channels, 'latent_scaling_factor': modules[
                'vae_encoder'].scaling_factor, 'vae_scale_factor': factor,
            'default_denoising_steps': steps, 'default_processing_resolution': resolution,
            'static': None if static_size is None else {
                'batch': batch, 'frame_size': list(static_size),
                'image_size': [latent[0] * factor, latent[1] * factor],
                'latent_size': list(latent)},
            'scheduler': 'scheduler/scheduler_config.json',
            'networks': networks,
            'pipeline_config': dict(config, default_denoising_steps=steps,
                                    default_processing_resolution=resolution),
        }
        with open(partial / MANIFEST, 'w') as stream:
            json.dump(manifest, stream, indent=2)
        replace_folder(partial, outdir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return outdir


def main(argv=None):
    """Run ``marigold-export-onnx MODEL OUTDIR [options]`` (argv default: sys.argv)."""
    parser = argparse.ArgumentParser(
        description='Export a Marigold model to ONNX (VAE encoder, U-Net with the empty '
                    'prompt folded in, VAE decoder) for the onnxruntime backend, '
                    'TensorRT or trtexec.')
    parser.add_argument('model', help="HF id (local cache), diffusers folder or 'bundled:NAME'")
    parser.add_argument('outdir', help='output folder (created; a previous export replaced)')
    parser.add_argument('--fp16', action='store_true',
                        help='float16 weights and activations (for GPUs)')
    parser.add_argument('--resolution', type=int, default=0,
                        help="default processing resolution (longest side); 0: the model's")
    parser.add_argument('--static-size', default='', metavar='WIDTHxHEIGHT',
                        help='fix all shapes for camera frames of this size at --resolution '
                             '(TensorRT without optimisation profiles); default dynamic')
    parser.add_argument('--batch', type=int, default=1,
                        help='batch of the fixed shapes (frames x ensemble members per call)')
    parser.add_argument('--vae', choices=('model', 'tiny'), default='model',
                        help="'tiny' exports an AutoencoderTiny (TAESD) instead of the VAE")
    parser.add_argument('--tiny-vae', default='madebyollin/taesd',
                        help='the AutoencoderTiny for --vae tiny (HF id or folder)')
    args = parser.parse_args(argv)
    try:
        static = parse_size(args.static_size) if args.static_size else None
    except ValueError as error:
        parser.error(str(error))
    path = export_onnx(args.model, args.outdir, args.fp16, args.resolution, static, args.batch,
                       args.vae, args.tiny_vae)
    manifest = json.loads((path / MANIFEST).read_text())
    for name, entry in manifest['networks'].items():
        shapes = ', '.join(f'{k} {v["shape"]}' for k, v in entry['inputs'].items())
        print(f'{name}: {path / entry["file"]} ({shapes})')
    print(f'manifest: {path / MANIFEST}')


if __name__ == '__main__':
    main()
