"""ONNX export and the onnxruntime backend: same depth as the torch backend, on CPU."""

import json
import math

from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_model.estimator import DepthEstimator
from marigold_model.loading import BUNDLED_DIR, WeightsNotFoundError
from marigold_model.onnx_backend import choose_providers
from marigold_model.onnx_export import export_onnx, main, MANIFEST
import numpy as np
import pytest
import torch

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

BUNDLED = 'bundled:marigold-tiny'
# fp32 depth in [0, 1]: the bound on |onnxruntime - torch|
TOLERANCE = 1e-4


def _pair(model, export, inference, **model_settings):
    """Make a torch and an onnxruntime estimator of the same weights and settings."""
    torch_side = DepthEstimator(EstimatorConfig(
        ModelConfig(model=model, device='cpu', **model_settings), inference))
    onnx_side = DepthEstimator(EstimatorConfig(
        ModelConfig(model=str(export), device='cpu', backend='onnxruntime', **model_settings),
        inference))
    return torch_side, onnx_side


def _frames(*shapes):
    return [np.random.default_rng(i).integers(0, 256, s, np.uint8) for i, s in enumerate(shapes)]


def _max_difference(first, second):
    """Largest |depth| and |uncertainty| difference over results of the same frames."""
    worst = 0.0
    for a, b in zip(first, second):
        assert a.depth.shape == b.depth.shape
        worst = max(worst, float(np.abs(a.depth - b.depth).max()))
        assert (a.uncertainty is None) == (b.uncertainty is None)
        if a.uncertainty is not None:
            worst = max(worst, float(np.abs(a.uncertainty - b.uncertainty).max()))
    return worst


@pytest.fixture(scope='module')
def bundled_export(tmp_path_factory):
    return export_onnx(BUNDLED, tmp_path_factory.mktemp('onnx') / 'bundled')


@pytest.fixture(scope='module')
def full_layout_model(tmp_path_factory):
    """
    Save a random model of Marigold v1-1's layout (SD2 U-Net and VAE) at reduced widths.

    The blocks, layers, attention kinds, 77 x 1024 text embedding and the x8 VAE are v1-1's;
    channels are 320/640/1280/1280 -> 32/64/128/128 and 128/256/512/512 -> 32/64/128/128
    (heads 5/10/20/20 -> 2/4/8/8), since exporting the 866 M parameter U-Net is minutes here.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from marigold_model.architecture import marigold_scheduler_config, save_marigold
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=96, in_channels=8, out_channels=4, layers_per_block=2,
        down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
        up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
        block_out_channels=(32, 64, 128, 128), attention_head_dim=(2, 4, 8, 8),
        cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
        block_out_channels=(32, 64, 128, 128), norm_num_groups=32, sample_size=768)
    text = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp('full_layout') / 'model'
    save_marigold(folder, unet, vae, text, 4, 96, scheduler_config=marigold_scheduler_config())
    return folder


def test_backend_setting_is_validated():
    """Only the two backends are accepted, named in the error."""
    assert ModelConfig(backend='onnxruntime').backend == 'onnxruntime'
    with pytest.raises(ValueError, match='backend'):
        ModelConfig(backend='tensorflow')


def test_execution_providers_in_order_and_only_installed(tmp_path):
    """TensorRT, CUDA, CPU among the installed ones; 'cpu' keeps CPU; 'cuda' needs a GPU."""
    every = ['AzureExecutionProvider', 'CPUExecutionProvider', 'CUDAExecutionProvider',
             'TensorrtExecutionProvider']
    chosen = choose_providers('cuda:1', every, tmp_path, True)
    assert [name for name, _ in chosen] == ['TensorrtExecutionProvider', 'CUDAExecutionProvider',
                                            'CPUExecutionProvider']
    trt = chosen[0][1]
    assert trt['device_id'] == 1 and trt['trt_fp16_enable'] is True
    assert trt['trt_engine_cache_enable'] and trt['trt_engine_cache_path'] == str(tmp_path)
    assert [n for n, _ in choose_providers('auto', every[:3], tmp_path, False)] == [
        'CUDAExecutionProvider', 'CPUExecutionProvider']
    assert [n for n, _ in choose_providers('cpu', every, tmp_path, False)] == [
        'CPUExecutionProvider']
    with pytest.raises(ValueError, match='no GPU execution provider'):
        choose_providers('cuda', every[:2], tmp_path, False)


def test_export_manifest_and_checker(bundled_export):
    """Three checked networks; the U-Net takes only [latent 8ch, timestep]; the manifest."""
    from diffusers import AutoencoderKL
    manifest = json.loads((bundled_export / MANIFEST).read_text())
    assert set(manifest['networks']) == {'vae_encoder', 'unet', 'vae_decoder'}
    for entry in manifest['networks'].values():
        onnx.checker.check_model(str(bundled_export / entry['file']))
        assert entry['external_data'] is None
    unet = manifest['networks']['unet']
    assert list(unet['inputs']) == ['sample', 'timestep']
    assert unet['inputs']['sample']['shape'][:2] == ['batch', 8]
    assert manifest['networks']['vae_decoder']['outputs']['depth']['shape'] == [
        'batch', 1, 'height', 'width']
    assert manifest['networks']['vae_encoder']['outputs']['latent']['shape'] == [
        'batch', 4, 'latent_height', 'latent_width']
    session = ort.InferenceSession(str(bundled_export / 'unet.onnx'),
                                   providers=['CPUExecutionProvider'])
    assert [i.name for i in session.get_inputs()] == ['sample', 'timestep']
    model_index = json.loads((BUNDLED_DIR / 'marigold-tiny' / 'model_index.json').read_text())
    assert manifest['default_denoising_steps'] == model_index['default_denoising_steps']
    assert (manifest['default_processing_resolution']
            == model_index['default_processing_resolution'])
    vae = AutoencoderKL.load_config(manifest['source_path'] + '/vae')
    assert math.isclose(manifest['latent_scaling_factor'], vae['scaling_factor'])
    assert manifest['dtype'] == 'float32' and manifest['static'] is None
    assert (bundled_export / manifest['scheduler']).is_file()


def test_bundled_model_parity(bundled_export):
    """Frames of two sizes, an ensemble split over batches: onnxruntime = torch within 1e-4."""
    inference = InferenceConfig(denoising_steps=2, ensemble_size=3, batch_size=2, seed=5)
    torch_side, onnx_side = _pair(BUNDLED, bundled_export, inference)
    assert onnx_side.networks.providers == ['CPUExecutionProvider']
    assert onnx_side.resolved_settings() == torch_side.resolved_settings()
    frames = _frames((48, 70, 3), (50, 50, 3))
    assert _max_difference(torch_side.estimate(frames), onnx_side.estimate(frames)) <= TOLERANCE


def test_warm_start_parity(bundled_export):
    """Video warm start re-noises the previous latent alike with both backends."""
    inference = InferenceConfig(denoising_steps=2, warm_start_strength=0.5, seed=2)
    torch_side, onnx_side = _pair(BUNDLED, bundled_export, inference)
    for frame in _frames((40, 60, 3), (40, 60, 3), (40, 60, 3)):
        ours = [side.estimate([frame], keys=['camera'])[0] for side in (torch_side, onnx_side)]
        assert _max_difference([ours[0]], [ours[1]]) <= TOLERANCE
        assert torch.allclose(ours[0].latent, ours[1].latent, atol=1e-4)


def test_full_layout_parity_with_external_data(full_layout_model, tmp_path):
    """v1-1's layout at odd latent sizes (explicit upsampling sizes), weights in .data files."""
    export = export_onnx(str(full_layout_model), tmp_path / 'onnx', external_data_bytes=0)
    manifest = json.loads((export / MANIFEST).read_text())
    for entry in manifest['networks'].values():
        assert entry['external_data'] == entry['file'] + '.data'
        assert (export / entry['external_data']).stat().st_size > 0
        onnx.checker.check_model(str(export / entry['file']))
    assert manifest['vae_scale_factor'] == 8
    # 96 px: latents 12 x 9 and 12 x 12; the U-Net halves three times (9 -> 5 -> 3 -> 2)
    inference = InferenceConfig(denoising_steps=2, ensemble_size=2, seed=1)
    torch_side, onnx_side = _pair(str(full_layout_model), export, inference)
    frames = _frames((72, 96, 3), (80, 80, 3))
    assert _max_difference(torch_side.estimate(frames), onnx_side.estimate(frames)) <= TOLERANCE


def test_tiny_vae_export_parity(random_model_dir, tmp_path):
    """With vae 'tiny' the AutoencoderTiny is exported; a mismatched vae setting is refused."""
    from diffusers import AutoencoderTiny
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(
        16, 16, 16), num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1),
        latent_channels=4).save_pretrained(tmp_path / 'taesd')
    tiny = str(tmp_path / 'taesd')
    export = export_onnx(random_model_dir, tmp_path / 'onnx', vae='tiny', tiny_vae=tiny)
    inference = InferenceConfig(denoising_steps=2, seed=4)
    torch_side, onnx_side = _pair(random_model_dir, export, inference, vae='tiny',
                                  tiny_vae=tiny)
    frames = _frames((50, 64, 3))
    assert _max_difference(torch_side.estimate(frames), onnx_side.estimate(frames)) <= TOLERANCE
    with pytest.raises(ValueError, match="exported with vae 'tiny'"):
        DepthEstimator(EstimatorConfig(ModelConfig(model=str(export), backend='onnxruntime')))


def test_static_shapes_from_the_command_line(random_model_dir, tmp_path, capsys):
    """--static-size fixes every shape; other batches are split and padded, other sizes refused."""
    main([random_model_dir, str(tmp_path / 'onnx'), '--static-size', '70x50', '--batch', '2',
          '--resolution', '48'])
    assert 'unet.onnx' in capsys.readouterr().out
    export = tmp_path / 'onnx'
    manifest = json.loads((export / MANIFEST).read_text())
    assert manifest['static']['batch'] == 2 and manifest['default_processing_resolution'] == 48
    # 70 x 50 at 48 px: 48 x 34, padded to 48 x 36 (the VAE's x4), latents 12 x 9
    assert manifest['networks']['unet']['inputs']['sample']['shape'] == [2, 8, 9, 12]
    inference = InferenceConfig(denoising_steps=1, ensemble_size=3, batch_size=4, seed=6)
    torch_side, onnx_side = _pair(random_model_dir, export, inference)
    frames = _frames((50, 70, 3))
    torch_side.set_inference(InferenceConfig(denoising_steps=1, ensemble_size=3, batch_size=4,
                                             seed=6, processing_resolution=48))
    assert _max_difference(torch_side.estimate(frames), onnx_side.estimate(frames)) <= TOLERANCE
    with pytest.raises(ValueError, match='fixed shapes'):
        onnx_side.estimate(_frames((60, 60, 3)))


def test_fp16_export(random_model_dir, tmp_path):
    """--fp16 writes float16 networks (timestep stays float32) that the CPU provider runs."""
    export = export_onnx(random_model_dir, tmp_path / 'onnx', fp16=True)
    manifest = json.loads((export / MANIFEST).read_text())
    unet = manifest['networks']['unet']['inputs']
    assert manifest['dtype'] == 'float16' and unet['sample']['dtype'] == 'float16'
    assert unet['timestep']['dtype'] == 'float32'
    inference = InferenceConfig(denoising_steps=2, seed=3)
    torch_side, onnx_side = _pair(random_model_dir, export, inference)
    frames = _frames((50, 64, 3))
    # half precision: a looser bound than fp32's, still far below the depth range
    assert _max_difference(torch_side.estimate(frames), onnx_side.estimate(frames)) <= 1e-2
    with pytest.raises(ValueError, match='float16'):
        DepthEstimator(EstimatorConfig(ModelConfig(model=str(export), backend='onnxruntime',
                                                   dtype='float32')))


def test_a_diffusers_model_is_refused_with_the_export_command(random_model_dir, tmp_path):
    """The backend loads exports only; the error says how to make one."""
    with pytest.raises(WeightsNotFoundError, match='marigold-export-onnx'):
        DepthEstimator(EstimatorConfig(ModelConfig(model=random_model_dir,
                                                   backend='onnxruntime')))
    (tmp_path / 'taken').mkdir()
    (tmp_path / 'taken' / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='not an ONNX export'):
        export_onnx(random_model_dir, tmp_path / 'taken')


def test_estimate_command_line_backend_flag(bundled_export, tmp_path, capsys):
    """marigold-estimate --backend onnxruntime writes the torch backend's 16-bit depth."""
    from marigold_model.cli import main as estimate
    from PIL import Image
    image = tmp_path / 'frame.png'
    Image.fromarray(_frames((40, 56, 3))[0]).save(image)
    common = [str(image), '--device', 'cpu', '--steps', '2', '--ensemble', '2', '--seed', '4']
    assert estimate(common + ['--model', BUNDLED, '--output', str(tmp_path / 'torch')]) == 0
    assert estimate(common + ['--model', str(bundled_export), '--backend', 'onnxruntime',
                              '--output', str(tmp_path / 'onnx')]) == 0
    written = [np.asarray(Image.open(tmp_path / side / 'frame_depth16.png'), np.int64)
               for side in ('torch', 'onnx')]
    assert written[0].shape == (40, 56) and written[0].min() >= 1
    # 1 + round(depth * 65534): the depth bound in PNG units, plus one for the rounding
    assert np.abs(written[0] - written[1]).max() <= TOLERANCE * 65534 + 1
    # The default backend (torch) loads only diffusers models: an export is refused.
    assert estimate([str(image), '--model', str(bundled_export), '--device', 'cpu']) == 2
    assert 'not a diffusers model folder' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        estimate([str(image), '--backend', 'tensorflow'])
    assert 'onnxruntime' in capsys.readouterr().err
