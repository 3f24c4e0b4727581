"""DepthEstimator: equality with diffusers' MarigoldDepthPipeline, batching, bad input."""

import dataclasses

from builders import orbit_scenes
from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_model.estimator import DepthEstimator, processing_size
import numpy as np
import pytest
import torch


def _estimator(model_dir, **inference):
    return DepthEstimator(EstimatorConfig(ModelConfig(model=model_dir, device='cpu'),
                                          InferenceConfig(**inference)))


@pytest.fixture(scope='module')
def reference_pipeline(random_model_dir):
    from diffusers import MarigoldDepthPipeline
    from safetensors.torch import load_file
    pipe = MarigoldDepthPipeline.from_pretrained(random_model_dir, text_encoder=None,
                                                 tokenizer=None)
    embedding = load_file(f'{random_model_dir}/empty_text_embedding.safetensors')['embedding']
    pipe.empty_text_embedding = embedding
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope='module')
def frame():
    return np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)


@pytest.mark.parametrize('steps,resolution,match', [(1, 64, True), (4, 64, True),
                                                    (2, 40, False), (1, 0, True)])
def test_equals_diffusers_pipeline(random_model_dir, reference_pipeline, frame, steps,
                                   resolution, match):
    """Same weights, input and noise give the pipeline's depth within 1e-5 (fp32)."""
    estimator = _estimator(random_model_dir, denoising_steps=steps, seed=7,
                           processing_resolution=resolution, match_input_resolution=match)
    ours = estimator.estimate(frame)
    ref = reference_pipeline(frame, num_inference_steps=steps,
                             processing_resolution=resolution or None,
                             match_input_resolution=match,
                             generator=torch.Generator().manual_seed(7))
    expected = ref.prediction[0, :, :, 0]
    assert ours.depth.shape == expected.shape
    assert ours.depth.dtype == np.float32
    assert np.abs(ours.depth - expected).max() <= 1e-5


def test_ensemble_members_equal_pipeline_latents(random_model_dir, reference_pipeline, frame):
    """With an ensemble, every member's final latent equals the pipeline's."""
    estimator = _estimator(random_model_dir, denoising_steps=2, ensemble_size=3, seed=3,
                           processing_resolution=48, match_input_resolution=False)
    ours = estimator.estimate(frame)
    ref = reference_pipeline(frame, num_inference_steps=2, ensemble_size=3,
                             processing_resolution=48, batch_size=4, output_latent=True,
                             match_input_resolution=False,
                             generator=torch.Generator().manual_seed(3))
    assert ours.latent.shape == ref.latent.shape
    assert (ours.latent - ref.latent).abs().max().item() <= 1e-5
    assert ours.uncertainty is not None and ours.uncertainty.shape == (34, 48)
    assert np.all(ours.uncertainty >= 0)
    assert ours.depth.min() == pytest.approx(0.0, abs=1e-6)
    assert ours.depth.max() == pytest.approx(1.0, abs=1e-6)


def test_deterministic_for_a_seed(random_model_dir, frame):
    """The same seed gives the same depth; another seed a different one."""
    first = _estimator(random_model_dir, seed=1).estimate(frame).depth
    again = _estimator(random_model_dir, seed=1).estimate(frame).depth
    other = _estimator(random_model_dir, seed=2).estimate(frame).depth
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_batch_of_cameras_with_different_sizes(random_model_dir, frame):
    """Frames of several sizes in one call equal the frames estimated one by one."""
    estimator = _estimator(random_model_dir, processing_resolution=64, batch_size=4)
    rng = np.random.default_rng(5)
    frames = [frame, rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), frame[:, :60],
              rng.integers(0, 256, (64, 48), dtype=np.uint8)]
    batched = estimator.estimate(frames)
    assert len(batched) == len(frames)
    for image, result in zip(frames, batched):
        single = estimator.estimate(image)
        assert result.depth.shape == image.shape[:2]
        assert np.abs(result.depth - single.depth).max() < 1e-4
    assert set(batched[0].timings) >= {'preprocess', 'encode', 'unet', 'unet_per_step',
                                       'decode', 'ensemble', 'postprocess', 'total'}


def test_processing_size_matches_diffusers_rule():
    """The longest side becomes the resolution, with integer division like diffusers."""
    assert processing_size(480, 640, 768) == (576, 768)
    assert processing_size(50, 70, 64) == (45, 64)
    assert processing_size(50, 70, 0) == (50, 70)


def test_runtime_settings_change(random_model_dir, frame):
    """Steps, ensemble and resolution can change between calls; bad values are refused."""
    estimator = _estimator(random_model_dir)
    assert estimator.resolved_settings() == (2, 64)  # the model's defaults
    estimator.set_inference(InferenceConfig(denoising_steps=1, ensemble_size=2,
                                            processing_resolution=32,
                                            match_input_resolution=False))
    result = estimator.estimate(frame)
    assert result.processing_size == (22, 32)
    assert result.depth.shape == (22, 32)
    assert result.uncertainty is not None
    with pytest.raises(ValueError, match='ensemble_size'):
        estimator.set_inference(InferenceConfig(ensemble_size=0))
    for name, value in (('ensemble_max_res', 0), ('ensemble_max_iter', 0),
                        ('ensemble_tol', -1e-3), ('ensemble_regularizer', float('nan'))):
        with pytest.raises(ValueError, match=name):
            estimator.set_inference(InferenceConfig(**{name: value}))


@pytest.mark.parametrize('bad,message', [
    (np.zeros((0, 5, 3), np.uint8), 'empty'),
    (np.zeros((5, 5, 4), np.uint8), 'shape'),
    (np.zeros((5, 5, 3), np.int32), 'dtype'),
    (np.full((5, 5, 3), np.nan, np.float32), 'NaN'),
    (np.full((5, 5, 3), 2.0, np.float32), 'within'),
    (np.zeros((300, 300, 3), np.uint8), 'exceeds'),
    ([], 'no frames'),
    ('image', 'numpy'),
])
def test_bad_input_names_the_problem(random_model_dir, bad, message):
    """Bad frames raise ValueError that says what is wrong."""
    estimator = DepthEstimator(EstimatorConfig(ModelConfig(model=random_model_dir,
                                                           max_input_pixels=200 * 200)))
    with pytest.raises(ValueError, match=message):
        estimator.estimate(bad if not isinstance(bad, str) else [bad])


def test_unsupported_device_and_dtype(random_model_dir):
    """Devices that are not here and unknown dtypes are refused clearly."""
    with pytest.raises(ValueError, match='device'):
        DepthEstimator(EstimatorConfig(ModelConfig(model=random_model_dir, device='tpu')))
    with pytest.raises(ValueError, match='dtype'):
        DepthEstimator(EstimatorConfig(ModelConfig(model=random_model_dir, dtype='int8')))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            DepthEstimator(EstimatorConfig(ModelConfig(model=random_model_dir, device='cuda')))


def test_warm_start_uses_previous_latent(random_model_dir, frame):
    """With warm start the second frame of a stream starts from the first one's latent."""
    estimator = _estimator(random_model_dir, denoising_steps=2, warm_start_strength=0.5)
    first = estimator.estimate([frame], keys=['cam'])[0]
    second = estimator.estimate([frame], keys=['cam'])[0]
    cold = estimator.estimate([frame])[0]
    assert np.array_equal(first.depth, cold.depth)  # nothing to start from yet
    assert not np.allclose(second.depth, cold.depth)
    estimator.reset_warm_start('cam')
    assert np.array_equal(estimator.estimate([frame], keys=['cam'])[0].depth, cold.depth)


@pytest.mark.parametrize('strength, steps', [(0.5, 2), (0.35, 4), (0.002, 4), (0.5, 3)])
def test_warm_start_schedule_chains_its_steps(random_model_dir, strength, steps):
    """Distinct decreasing timesteps >= 0, each step ending where the next begins."""
    estimator = _estimator(random_model_dir, denoising_steps=steps)
    timesteps, previous, _ = estimator._schedule(steps, strength)
    assert len(timesteps) == steps and timesteps[-1] >= 0
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))
    assert previous == timesteps[1:] + [-1]  # -1: the scheduler's final alpha


def test_warm_start_needs_a_ddim_scheduler(random_model_dir):
    """Other schedulers only step through their own timesteps: warm start is refused."""
    from diffusers import LCMScheduler
    estimator = _estimator(random_model_dir)
    estimator.scheduler = LCMScheduler.from_config(estimator.scheduler.config)
    with pytest.raises(ValueError, match='DDIM scheduler'):
        estimator.set_inference(InferenceConfig(warm_start_strength=0.5))
    estimator.set_inference(InferenceConfig(denoising_steps=2))  # without warm start: fine


def test_stochastic_scheduler_results_do_not_depend_on_the_batch(random_model_dir, frame):
    """LCM adds noise between steps: a frame's result is the same alone or in any batch."""
    from diffusers import LCMScheduler
    results = []
    for batch_size, frames in ((4, [frame[::-1], frame]), (1, [frame])):
        estimator = _estimator(random_model_dir, denoising_steps=3, ensemble_size=2,
                               batch_size=batch_size)
        estimator.scheduler = LCMScheduler.from_config(estimator.scheduler.config)
        results.append(estimator.estimate(frames)[-1].depth)
    # Batched convolutions differ in the last bits only; other noise differs by far more.
    np.testing.assert_allclose(results[0], results[1], atol=1e-4)


# ---- CPU speed options on the bundled (trained) model, against its fp32 eager result -------

BUNDLED = 'bundled:marigold-tiny'


def _bundled(**model):
    return DepthEstimator(EstimatorConfig(
        ModelConfig(model=BUNDLED, device='cpu', **model),
        InferenceConfig(processing_resolution=64, denoising_steps=1, seed=3)))


@pytest.fixture(scope='module')
def rooms():
    """RGB of two 48x64 synthetic rooms: the kind of image the bundled model was trained on."""
    return [s.rgb for s in orbit_scenes(2)]


@pytest.fixture(scope='module')
def fp32_eager(rooms):
    """Run the reference: fp32 weights, no compile, contiguous (NCHW) memory."""
    estimator = _bundled(dtype='float32', channels_last=False)
    return np.stack([r.depth for r in estimator.estimate(rooms)])


def _max_diff(estimator, rooms, reference):
    return float(np.abs(np.stack([r.depth for r in estimator.estimate(rooms)]) -
                        reference).max())


@pytest.mark.parametrize('dtype,bound', [('float16', 4e-3), ('bfloat16', 3e-2)])
def test_low_precision_weights_on_cpu_stay_close_to_fp32(rooms, fp32_eager, dtype, bound):
    """
    fp16 / bf16 weights on CPU give the fp32 depth within a few roundings of that format.

    Depth is in [0, 1].  Measured max |difference| over both frames (torch 2.13 CPU):
    fp16 8.0e-4 (mean 1.2e-4), bf16 7.0e-3 (mean 9.5e-4), about 1.6 and 1.8 units of the
    format's rounding at 1 (fp16 2^-11 = 4.9e-4, bf16 2^-8 = 3.9e-3).  The bounds, 8 units
    (4e-3, 3e-2), leave room for other CPUs' kernels; a wrong scale or a skipped step is off
    by 0.1 or more.  The difference must not be 0: the weights really are in that dtype.
    Antialiased resizing has no half-precision CPU kernel; it runs in float32 (else this
    raised).
    """
    estimator = _bundled(dtype=dtype)
    assert estimator.unet.dtype == estimator.vae.dtype == getattr(torch, dtype)
    assert 0 < _max_diff(estimator, rooms, fp32_eager) <= bound


def test_channels_last_on_cpu_matches_fp32_eager(rooms, fp32_eager):
    """
    channels_last on CPU: the switch is ignored (config), torch's kernels are close.

    With the switch on, the modules stay contiguous and the result is the eager one, bit
    for bit.  Converted to channels_last by hand (what the CUDA path does), torch's CPU
    channels_last kernels give the contiguous result within fp32 rounding: measured max
    |difference| 4.8e-7 (4 fp32 units at 1: reordered sums); bound 1e-5.
    """
    switched = _bundled(dtype='float32', channels_last=True)
    assert not switched.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert _max_diff(switched, rooms, fp32_eager) == 0.0
    # What the CUDA path does to the modules, here on CPU.
    switched.unet.to(memory_format=torch.channels_last)
    switched.vae.to(memory_format=torch.channels_last)
    assert switched.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert _max_diff(switched, rooms, fp32_eager) <= 1e-5


def test_compile_switch_is_ignored_on_cpu(rooms, fp32_eager):
    """compile=True is a CUDA switch (config): on CPU the result is the eager one, bit for bit."""
    assert _max_diff(_bundled(dtype='float32', compile=True), rooms, fp32_eager) == 0.0


def test_torch_compile_on_cpu_matches_fp32_eager(rooms, fp32_eager):
    """
    The U-Net compiled by inductor on CPU gives the eager depth within fp32 rounding.

    Measured max |difference| 4.8e-7 (fused kernels reorder sums); bound 1e-5.  The slowest
    test: the first call compiles for 100-115 s on two cores with a cold inductor cache
    (~18 s warm), so .ci/run runs it once, in its first ROS distribution's pass.
    """
    estimator = _bundled(dtype='float32', channels_last=False)
    estimator.unet.compile(dynamic=False)
    assert _max_diff(estimator, rooms, fp32_eager) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason='a CUDA-only path: runs where torch sees a CUDA GPU (a CUDA build '
                    'of torch and an NVIDIA driver)')
def test_cuda_fp16_path(random_model_dir, frame):
    """On CUDA the default dtype is fp16, channels_last is applied and results stay close."""
    gpu = DepthEstimator(EstimatorConfig(ModelConfig(model=random_model_dir, device='cuda')))
    assert gpu.dtype == torch.float16
    # The result's latent is a CPU copy: results kept by a caller hold no device memory.
    assert gpu.estimate(frame).latent.device.type == 'cpu'
    cpu = _estimator(random_model_dir)
    assert np.abs(gpu.estimate(frame).depth - cpu.estimate(frame).depth).mean() < 0.05


def test_tiny_vae_option(tmp_path):
    """
    vae='tiny' swaps in an AutoencoderTiny (TAESD-style) from a local folder, and decodes.

    No TAESD trained for the bundled model's latents exists offline, so a random one cannot
    be held to the fp32 AutoencoderKL result; what is checked by hand is the decode: the
    depth equals (channel mean of decoder(latent / scaling_factor), clipped, + 1) / 2 of
    the returned latent.  A 64x64 frame at resolution 64 is neither resized nor padded.
    Its scaling factor is 1.5, so a missing division would show.
    """
    from diffusers import AutoencoderTiny
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(
        16, 16, 16), num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1),
        latent_channels=4, scaling_factor=1.5).save_pretrained(tmp_path / 'taesd')
    estimator = DepthEstimator(EstimatorConfig(
        ModelConfig(model=BUNDLED, device='cpu', vae='tiny', tiny_vae=str(tmp_path / 'taesd')),
        InferenceConfig(processing_resolution=64, denoising_steps=1, seed=3)))
    assert type(estimator.vae).__name__ == 'AutoencoderTiny'
    frame = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    result = estimator.estimate(frame)
    assert result.processing_size == (64, 64) and result.depth.shape == (64, 64)
    vae = AutoencoderTiny.from_pretrained(tmp_path / 'taesd')
    with torch.no_grad():
        decoded = vae.decode(result.latent / 1.5).sample
    by_hand = ((decoded.mean(dim=1).clip(-1.0, 1.0) + 1.0) / 2.0)[0].numpy()
    np.testing.assert_allclose(result.depth, by_hand, atol=1e-6)
    with pytest.raises(FileNotFoundError, match='not found'):
        DepthEstimator(EstimatorConfig(ModelConfig(model=BUNDLED, vae='tiny',
                                                   tiny_vae=str(tmp_path / 'none'))))


def test_settings_changed_during_a_call_apply_from_the_next(random_model_dir, frame,
                                                            monkeypatch):
    """set_inference from another thread (the node's parameter callback) mid-call is safe."""
    estimator = _estimator(random_model_dir)
    before = estimator.config.inference
    after = dataclasses.replace(before, match_input_resolution=False, ensemble_size=2)
    denoise = estimator._denoise

    def changed_meanwhile(*args):
        estimator.set_inference(after)
        return denoise(*args)

    monkeypatch.setattr(estimator, '_denoise', changed_meanwhile)
    result = estimator.estimate(frame)
    assert result.depth.shape == frame.shape[:2] and result.uncertainty is None
    monkeypatch.setattr(estimator, '_denoise', denoise)
    result = estimator.estimate(frame)
    assert result.depth.shape != frame.shape[:2] and result.uncertainty is not None


def test_out_of_memory_keeps_nothing_of_the_failed_call(random_model_dir, frame, monkeypatch):
    """The error holds no traceback of the failed call, so its tensors can be freed."""
    import weakref

    from marigold_model.estimator import EstimatorOutOfMemory
    estimator = _estimator(random_model_dir)
    allocated = []

    def runs_out(*args):
        activations = torch.ones(1000)
        allocated.append(weakref.ref(activations))
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB\n'
                                          'details')

    monkeypatch.setattr(estimator, '_estimate', runs_out)
    expected = r'batch_size.*Tried to allocate 2\.00 GiB\)$'
    with pytest.raises(EstimatorOutOfMemory, match=expected) as error:
        estimator.estimate(frame)
    assert error.value.__cause__ is None and allocated[0]() is None


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason='a CUDA-only path: runs where torch sees a CUDA GPU (a CUDA build '
                    'of torch and an NVIDIA driver)')
def test_cuda_out_of_memory_is_explained(random_model_dir):
    """Running out of GPU memory raises an error that suggests what to lower."""
    from marigold_model.estimator import EstimatorOutOfMemory
    estimator = DepthEstimator(EstimatorConfig(
        ModelConfig(model=random_model_dir, device='cuda', max_input_pixels=10 ** 9),
        InferenceConfig(processing_resolution=-1, ensemble_size=64, batch_size=64)))
    with pytest.raises(EstimatorOutOfMemory, match='processing_resolution'):
        estimator.estimate(np.zeros((16384, 16384, 3), np.uint8))


def test_command_line_depth_png_keeps_the_nearest_point_apart_from_holes(tmp_path):
    """The CLI's 16-bit PNG: relative 0 (nearest) is 1, only a hole is 0."""
    from marigold_model.cli import write_outputs
    from marigold_model.estimator import DepthResult
    from PIL import Image
    depth = np.array([[0.0, 0.5], [1.0, np.nan]], np.float32)
    rgb = np.zeros((2, 2, 3), np.uint8)
    paths = write_outputs(tmp_path, 'x', rgb, DepthResult(depth, None, {}, (2, 2)))
    assert np.asarray(Image.open(paths[0])).tolist() == [[1, 32768], [65535, 0]]
    preview = np.asarray(Image.open(paths[1]))[:, 2:]
    assert preview[0, 0].any() and not preview[1, 1].any()  # nearest coloured, hole black
