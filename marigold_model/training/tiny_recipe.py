"""
Reproduce the bundled tiny Marigold model on a CPU: ``make train-tiny``.

Stages (each resumable; outputs under ``--work``):

1. render procedural synthetic RGB-D scenes (train and a disjoint held-out test set);
2. train a small AutoencoderKL on their RGB and normalised depth (vae_training);
3. build a Marigold-architecture model around it (random 8-channel U-Net) and train the
   U-Net with this project's trainer (v-prediction, zero-SNR DDPM, annealed pyramid noise);
4. export (fp16 weights) into ``--output`` and evaluate against trivial baselines on the
   held-out scenes, writing the model card.
"""

import argparse
from dataclasses import asdict, dataclass
import json
from pathlib import Path
import shutil
import sys
import time

import numpy as np
import torch

from .evaluate import bootstrap_interval, evaluate, markdown_table, open_dataset
from .train_config import DataSpec, TrainConfig
from .trainer import Trainer
from .training_data import build_training_data
from .vae_training import fit_scaling_factor, reconstruction_error, rgb_psnr, train_vae
from .vae_training import VaeTrainConfig
from .. import yaml12
from ..alignment import normalize_percentile
from ..architecture import build_unet, build_vae, empty_text_embedding, save_marigold
from ..architecture import replace_folder, TinyArchitecture

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # marigold_model
RECIPE_FILE = PACKAGE_DIR / 'recipes' / 'tiny.yaml'
MODEL_DIR = PACKAGE_DIR / 'models' / 'marigold-tiny'  # where the shipped model lives


@dataclass(frozen=True)
class TinyRecipe:
    """Settings of the tiny model recipe (defaults: the shipped model)."""

    resolution: int = 64
    train_scenes: int = 18000
    test_scenes: int = 100
    val_scenes: int = 256
    train_seed: int = 1
    test_seed: int = 1_000_001
    val_seed: int = 2_000_001
    unet_channels: tuple = (48, 96, 144)
    vae_channels: tuple = (32, 64, 64)
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_rgb_share: float = 0.75
    unet_steps: int = 9000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup_steps: int = 50
    ema_decay: float = 0.998
    final_timestep_share: float = 0.85
    affine_depth_steps: int = 0
    seed: int = 0


def load_recipe(path=RECIPE_FILE, overrides=()):
    """Read the recipe YAML, apply 'key=value' overrides and return the TinyRecipe."""
    values = yaml12.load(Path(path).read_text()) or {}
    for item in overrides:
        key, value = item.split('=', 1)
        values[key] = yaml12.load(value)
    for key in ('unet_channels', 'vae_channels'):
        if key in values:
            values[key] = tuple(values[key])
    return TinyRecipe(**values)


class SampleBank(torch.utils.data.Dataset):
    """Samples held in memory (pre-rendered scenes)."""

    def __init__(self, samples):
        """Keep the samples."""
        self.samples = list(samples)

    def __len__(self):
        """Return the number of samples."""
        return len(self.samples)

    def __getitem__(self, index):
        """Return the sample at ``index``."""
        return self.samples[index]


def render_set(count, seed, resolution, log):
    """Render ``count`` square synthetic scenes deterministically (scene i uses [seed, i])."""
    from ..data.synthetic import SceneConfig, SyntheticDataset
    dataset = SyntheticDataset(length=count, seed=seed,
                               config=SceneConfig(height=resolution, width=resolution))
    clock = time.perf_counter()
    samples = [dataset[i] for i in range(count)]
    log(f'rendered {count} scenes in {time.perf_counter() - clock:.1f} s')
    return samples


def _stack(samples):
    rgb = np.stack([s.rgb for s in samples])
    depth = np.stack([normalize_percentile(s.depth, s.valid) for s in samples]).astype(np.float32)
    return rgb, depth


VAE_WEIGHTS = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')


def vae_complete(folder):
    """Tell whether the VAE stage finished: config and weights are both in ``folder``."""
    # save_pretrained writes config.json before the weights, so config.json alone can be
    # the trace of an interrupted save.
    folder = Path(folder)
    weights = any((folder / name).is_file() for name in VAE_WEIGHTS)
    return (folder / 'config.json').is_file() and weights


def save_vae(vae, folder):
    """Save the trained VAE beside ``folder``, then rename it into place (never half-written)."""
    folder = Path(folder)
    partial = folder.with_name(f'.{folder.name}.partial')
    shutil.rmtree(partial, ignore_errors=True)
    vae.save_pretrained(partial)
    replace_folder(partial, folder)


def unet_config(recipe, work, base):
    """Return the U-Net stage's TrainConfig; its ``data`` names the rendered scenes exactly."""
    # The same stream render_set draws the training scenes from (SceneConfig at the training
    # resolution), so config.yaml and the model card describe the data trained on.
    scenes = DataSpec('synthetic', '', 1.0, {'length': recipe.train_scenes,
                                             'seed': recipe.train_seed})
    # Validation scenes: a third stream, apart from the training and the test scenes.
    held_out = DataSpec('synthetic', '', 1.0, {'length': recipe.val_scenes,
                                               'seed': recipe.val_seed})
    return TrainConfig(
        output_dir=str(Path(work) / 'unet'), base_model=str(base), data=(scenes,),
        val_data=(held_out,), val_samples=recipe.val_scenes, val_every=500,
        height=recipe.resolution, width=recipe.resolution, hflip=True,
        max_steps=recipe.unet_steps, batch_size=recipe.unet_batch,
        grad_accumulation=1, lr=recipe.unet_lr, optimizer='adamw',
        warmup_steps=recipe.warmup_steps,
        lr_schedule='cosine', lr_final_ratio=0.02, ema_decay=recipe.ema_decay, seed=recipe.seed,
        final_timestep_share=recipe.final_timestep_share,
        affine_depth_steps=recipe.affine_depth_steps,
        checkpoint_every=100, log_every=20, cache_latents=True, prefill_cache=True,
        export_fp16=True,
        export_steps=1, export_resolution=recipe.resolution)


def run(recipe, work, output, log=print, baseline_model=None):
    """
    Run every stage, skipping those whose output is already in ``work``.

    :param output: folder of the exported model
    :param baseline_model: optional earlier model to compare with on the held-out scenes
    :return: dict of figures measured (times, losses, metrics)
    """
    work, output = Path(work), Path(output)
    work.mkdir(parents=True, exist_ok=True)
    figures = {'recipe': asdict(recipe)}
    start = clock = time.perf_counter()
    train = render_set(recipe.train_scenes, recipe.train_seed, recipe.resolution, log)
    figures['render_s'] = time.perf_counter() - clock

    arch = TinyArchitecture(vae_channels=recipe.vae_channels, unet_channels=recipe.unet_channels,
                            processing_resolution=recipe.resolution, denoising_steps=1)
    vae_dir = work / 'vae'
    if not vae_complete(vae_dir):
        clock = time.perf_counter()
        torch.manual_seed(recipe.seed)
        vae = build_vae(arch)
        rgb, depth = _stack(train)
        losses = train_vae(vae, rgb, depth, VaeTrainConfig(
            steps=recipe.vae_steps, batch_size=recipe.vae_batch, lr=recipe.vae_lr,
            rgb_share=recipe.vae_rgb_share, seed=recipe.seed), log)
        factor = fit_scaling_factor(vae, rgb, depth)
        error = reconstruction_error(vae, depth)
        log(f'vae: scaling factor {factor:.4f}, depth round-trip error {error:.4f}')
        save_vae(vae, vae_dir)
        figures.update(vae_s=time.perf_counter() - clock, vae_final_loss=losses[-1],
                       vae_depth_roundtrip_error=error)
    # The starting point of the U-Net training: a random U-Net around the trained VAE.
    from diffusers import AutoencoderKL
    from .eval_datasets import synthetic_samples
    vae = AutoencoderKL.from_pretrained(vae_dir)
    held_out = synthetic_samples(recipe.test_scenes, recipe.test_seed, recipe.resolution)
    figures['vae_rgb_psnr_db'] = rgb_psnr(vae, np.stack([s.rgb for s in held_out]))
    log(f'vae: held-out RGB PSNR {figures["vae_rgb_psnr_db"]:.2f} dB')
    torch.manual_seed(recipe.seed)
    base = save_marigold(work / 'base', build_unet(arch), vae,
                         empty_text_embedding(arch, recipe.seed), 1, recipe.resolution,
                         extra={'architecture': asdict(arch)})

    config = unet_config(recipe, work, base)
    # The scenes config.data names, already rendered: drawn, cropped and flipped as the
    # trainer would draw them from config.data itself.
    dataset = build_training_data(config, sources=[SampleBank(train)])
    clock = time.perf_counter()
    trainer = Trainer(config, dataset=dataset)
    if sorted((work / 'unet' / 'checkpoints').glob('step_*')):
        trainer.resume('latest')
        log(f'resumed the U-Net training at step {trainer.step}')
    trainer.run()
    figures['unet_s'] = time.perf_counter() - clock
    figures['unet_final_loss'] = float(np.mean(trainer.losses[-50:]))
    # Mean loss of each tenth of each objective's steps: whether it was still falling at the
    # end (the velocity loss, then the end-to-end one; their scales differ).
    velocity_steps = recipe.unet_steps - recipe.affine_depth_steps
    figures['unet_loss_by_tenth'] = _tenths(trainer.losses[:velocity_steps])
    figures['affine_loss_by_tenth'] = _tenths(trainer.losses[velocity_steps:])
    figures['unet_val_loss'] = trainer.val_losses
    figures['unet_val_abs_rel'] = trainer.val_abs_rels
    path = trainer.export(output)
    figures['model_mb'] = sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 2 ** 20
    figures['total_s'] = time.perf_counter() - start
    log(f'exported to {path} ({figures["model_mb"]:.1f} MB)')
    clock = time.perf_counter()
    results = evaluate_model(recipe, output, log, baseline_model)
    figures['evaluate_s'] = time.perf_counter() - clock
    (work / 'figures.json').write_text(json.dumps(figures, indent=2, default=str))
    write_model_card(output, recipe, figures, results)
    return figures


def _tenths(losses):
    """Mean of each tenth of a loss curve (fewer parts for fewer values, none for none)."""
    if not len(losses):
        return []
    return [float(np.mean(part)) for part in np.array_split(losses, min(len(losses), 10))]


EVAL_SETTINGS = ((1, 1), (4, 1), (1, 5))
# The held-out sets: the scenes the model trains on, and the same scenes without the hard
# cases (the set the first bundled model was scored on).
EVAL_KINDS = ('synthetic', 'synthetic-basic')


def evaluate_model(recipe, model, log=print, baseline_model=None):
    """
    Score the model and two trivial baselines on the held-out synthetic scenes.

    The test scenes come from a random stream disjoint from the training scenes (see
    :func:`marigold_model.training.eval_datasets.synthetic_samples`); metrics follow the
    standard per-image least-squares protocol.

    :param baseline_model: optional earlier model, scored at one step on the same scenes
    :return: dict of data set spec -> list of result dicts (predictor, abs_rel, delta1, ...):
        constant, ramp, the model at each of EVAL_SETTINGS, then the baseline model if given
    """
    models = [(f'tiny model, {steps} step(s), ensemble {members}', model, steps, members)
              for steps, members in EVAL_SETTINGS]
    if baseline_model:
        models.append((f'previous model ({Path(baseline_model).name}), 1 step(s), ensemble 1',
                       baseline_model, 1, 1))
    scores = {}
    for kind in EVAL_KINDS:
        spec = f'{kind}:{recipe.test_scenes}:{recipe.test_seed}:{recipe.resolution}'
        dataset = open_dataset(spec)
        results = [evaluate(name, dataset) for name in ('constant', 'ramp')]
        results += [evaluate(_estimator(path, steps, members), dataset, name=name)
                    for name, path, steps, members in models]
        scores[spec] = results
        log(f'{spec}\n{markdown_table(results)}')
        for line in comparisons(results):
            log(line)
    return scores


def _estimator(model, steps, members):
    from ..config import EstimatorConfig, InferenceConfig, ModelConfig
    from ..estimator import DepthEstimator
    return DepthEstimator(EstimatorConfig(
        ModelConfig(model=str(model), device='cpu'),
        InferenceConfig(denoising_steps=steps, ensemble_size=members)))


def comparisons(results):
    """Paired comparisons of the model's one-step result with the ramp and any earlier model."""
    # Rows as evaluate_model orders them: constant, ramp, EVAL_SETTINGS, the earlier model.
    ramp, ours, earlier = results[1], results[2], results[2 + len(EVAL_SETTINGS):]
    return [paired_comparison(ours, other) for other in [ramp] + earlier]


def paired_comparison(model, baseline, resamples=10000, seed=0):
    """
    Compare two predictors image by image: how often and by how much the first wins.

    :param model: result dict of :func:`marigold_model.training.evaluate.evaluate`
    :param baseline: result dict of the baseline, on the same images
    :param resamples: bootstrap resamples of the images
    :return: one sentence with the share of images where ``model`` has the lower AbsRel and
        a 95 % bootstrap interval of the mean AbsRel difference
    """
    ours = np.asarray(model['abs_rel_per_image'])
    theirs = np.asarray(baseline['abs_rel_per_image'])
    if ours.shape != theirs.shape or not ours.size:
        raise ValueError('paired comparison needs the same scored images for both')
    difference = ours - theirs
    low, high = bootstrap_interval(difference, np.random.default_rng(seed), resamples)
    return (f'{model["predictor"]} has a lower AbsRel than {baseline["predictor"]} on '
            f'{(difference < 0).mean():.0%} of the {difference.size} images; mean AbsRel '
            f'difference {difference.mean():+.4f} (95 % bootstrap interval {low:+.4f} to '
            f'{high:+.4f}).')


def _figure(figures, key, style=''):
    """Format a training figure for the card ('not measured' where a reused stage left none)."""
    value = figures.get(key)
    if value is None:
        return 'not measured'
    if style == 'minutes':
        return f'{value / 60:.1f}'
    if isinstance(value, list):
        return ', '.join(f'{item:.3f}' for item in value)
    return format(value, style)


def write_model_card(output, recipe, figures, results):
    """
    Write README.md beside the weights: data, recipe, limits and measured accuracy.

    :param figures: dict of training figures from :func:`run`
    :param results: evaluation results from :func:`evaluate_model`
    :return: Path of the card
    """
    tables = '\n'.join(f'`{spec}`:\n\n{markdown_table(rows)}\n' + ''.join(
        f'{line}\n' for line in comparisons(rows)) for spec, rows in results.items())
    stages = [(name, figures.get(key)) for name, key in
              (('rendering', 'render_s'), ('VAE', 'vae_s'), ('U-Net', 'unet_s'))]
    timing = ', '.join(f'{name} {seconds / 60:.1f} min' if seconds is not None else
                       f'{name} reused from an earlier run of the same stage (not timed here)'
                       for name, seconds in stages)
    passes = recipe.unet_steps * recipe.unet_batch / max(recipe.train_scenes, 1)
    if figures.get('timing_note'):
        timing += f' ({figures["timing_note"]})'
    end_to_end = end_to_end_losses = ''
    if recipe.affine_depth_steps:
        end_to_end = (f'; the last {recipe.affine_depth_steps} steps train the one-step '
                      'estimate end to end: its clean latent decoded by the VAE, '
                      'affine-invariant L1 against the depth')
        end_to_end_losses = ('; mean end-to-end loss of each tenth of those steps: '
                             + _figure(figures, 'affine_loss_by_tenth'))
    validation, validation_abs_rel = (
        ', '.join(f'{step}: {value:.3f}' for step, value in figures.get(key, []))
        or 'not measured' for key in ('unet_val_loss', 'unet_val_abs_rel'))
    card = f"""# marigold-tiny

A tiny Marigold-architecture depth model (8-channel U-Net {list(recipe.unet_channels)},
AutoencoderKL {list(recipe.vae_channels)} with x{2 ** (len(recipe.vae_channels) - 1)}
downsampling, zero-SNR trailing DDIM, v-prediction) trained from scratch by marigold_ros's own
code, so that the demo and the tests run on real, learnt weights without a download. It is
NOT a substitute for prs-eth/marigold-depth-v1-1: it has seen only procedural rooms at
{recipe.resolution}x{recipe.resolution} pixels.

## Data
{recipe.train_scenes} procedural synthetic scenes (marigold_model.data.synthetic: rooms of
3-8 m with boxes and spheres, checker / stripe / sine textures, a point light with shadows,
fov 45-80 degrees, exact planar depth, and the hard cases: thin poles, shelves and bars,
occluders in front of objects, camouflaged objects and painted patches; `synthetic` with
length {recipe.train_scenes} and seed {recipe.train_seed}), each used once per pass, about
{passes:.1f} passes, mirrored at random in half of the draws.

## Recipe
`make train-tiny` (marigold_model/training/tiny_recipe.py with marigold_model/recipes/tiny.yaml):
1. render the scenes;
2. train the AutoencoderKL on RGB and normalised depth ({recipe.vae_steps} steps of batch
   {recipe.vae_batch}, {recipe.vae_rgb_share:.0%} of it RGB, lr {recipe.vae_lr}, L1 + MSE +
   small KL; latent scaling factor = 1 / latent std): held-out RGB comes back at
   {_figure(figures, 'vae_rgb_psnr_db', '.1f')} dB PSNR, depth maps with a mean error of
   {_figure(figures, 'vae_depth_roundtrip_error', '.4f')} (normalised units);
3. train the U-Net with `marigold_model.training.trainer` ({recipe.unet_steps} steps of batch
   {recipe.unet_batch}, AdamW lr {recipe.unet_lr}, warm-up then cosine decay, EMA
   {recipe.ema_decay}, annealed pyramid noise, 2 %/98 % depth normalisation,
   {recipe.final_timestep_share:.0%} of the draws at the last timestep, the one a one-step
   estimate runs{end_to_end}); mean velocity loss of each tenth of its steps:
   {_figure(figures, 'unet_loss_by_tenth')}{end_to_end_losses}; validation loss on
   {recipe.val_scenes} held-out scenes (seed {recipe.val_seed}) by step: {validation}; their
   one-step AbsRel by step: {validation_abs_rel};
4. export with fp16 weights ({figures.get('model_mb', 0):.1f} MB).
Stage times of this run on a 2-core CPU: {timing}; {_figure(figures, 'total_s', 'minutes')} min
from start to the exported model, then {_figure(figures, 'evaluate_s', 'minutes')} min of
evaluation.

## Accuracy
{recipe.test_scenes} held-out synthetic scenes (a random stream disjoint from training),
standard protocol (per-image least-squares scale and shift, AbsRel, delta1). `synthetic`: the
scenes as the model was trained on them, hard cases included; `synthetic-basic`: the same
scenes without the hard cases (the set the first bundled model was scored on).

{tables}
## Limits
Blurry at object edges and misses small objects; trained on indoor-like synthetic rooms
only; default processing resolution {recipe.resolution} px. For robots, use the real
Marigold weights.
"""
    path = Path(output) / 'README.md'
    path.write_text(card)
    return path


def main(argv=None):
    """Run the recipe's command line with ``argv``; return the exit code."""
    parser = argparse.ArgumentParser(description='Reproduce the bundled tiny Marigold model.')
    parser.add_argument('--recipe', default=str(RECIPE_FILE))
    parser.add_argument('--work', default='runs/tiny')
    parser.add_argument('--output', default=str(MODEL_DIR))
    parser.add_argument('--evaluate-only', action='store_true',
                        help='only evaluate the exported model and rewrite its card')
    parser.add_argument('--baseline-model', default=None,
                        help='an earlier model to compare with on the held-out scenes')
    parser.add_argument('overrides', nargs='*', help='key=value recipe settings')
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.evaluate_only:
        figures = json.loads((Path(args.work) / 'figures.json').read_text())
        write_model_card(args.output, recipe, figures,
                         evaluate_model(recipe, args.output, baseline_model=args.baseline_model))
        return 0
    run(recipe, args.work, args.output, baseline_model=args.baseline_model)
    return 0


if __name__ == '__main__':
    sys.exit(main())
