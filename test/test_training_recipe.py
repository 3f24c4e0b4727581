"""The tiny-model recipe: the data it records is the data it trains on; stages resume safely."""

import marigold_model.training.tiny_recipe as tiny_recipe
from marigold_model.training.tiny_recipe import TinyRecipe
from marigold_model.training.training_data import build_training_data
import numpy as np
import pytest

RECIPE = TinyRecipe(resolution=32, train_scenes=4, test_scenes=2, unet_channels=(32, 64),
                    vae_channels=(32, 32, 32), vae_steps=1, vae_batch=2, unet_steps=3,
                    unet_batch=2, warmup_steps=1, affine_depth_steps=1)


class _Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """Stop the recipe where it starts the U-Net training, keeping what it passes."""
    seen = {}

    class Capture:
        def __init__(self, config, dataset=None):
            seen.update(config=config, dataset=dataset)
            raise _Stop

    monkeypatch.setattr(tiny_recipe, 'Trainer', Capture)
    return seen


def test_recipe_config_names_the_scenes_it_trains_on(tmp_path, captured):
    """Rebuilding the training data from the recorded config gives the very same draws."""
    with pytest.raises(_Stop):
        tiny_recipe.run(RECIPE, tmp_path / 'work', tmp_path / 'model', log=lambda _: None)
    config, dataset = captured['config'], captured['dataset']
    rebuilt = build_training_data(config)
    assert len(rebuilt) == len(dataset) == RECIPE.train_scenes
    for i in range(len(dataset)):
        a, b = dataset[i], rebuilt[i]
        assert a.name == b.name
        assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.depth, b.depth)


def test_recipe_redoes_a_vae_stage_cut_short(tmp_path, captured):
    """vae/config.json without weights (a save cut short) does not count as a finished VAE."""
    from marigold_model.architecture import build_vae, TinyArchitecture
    vae_dir = tmp_path / 'work' / 'vae'
    build_vae(TinyArchitecture(vae_channels=RECIPE.vae_channels)).save_config(vae_dir)
    assert (vae_dir / 'config.json').is_file()
    with pytest.raises(_Stop):
        tiny_recipe.run(RECIPE, tmp_path / 'work', tmp_path / 'model', log=lambda _: None)
    assert (vae_dir / 'diffusion_pytorch_model.safetensors').is_file()
    assert tiny_recipe.vae_complete(vae_dir)


def test_recipe_overrides_read_floats_as_yaml_1_2():
    """'unet_lr=5e-4' is a number (PyYAML alone reads it as a string)."""
    recipe = tiny_recipe.load_recipe(overrides=['unet_lr=5e-4', 'unet_steps=3'])
    assert recipe.unet_lr == 5e-4 and recipe.unet_steps == 3


def test_loss_tenths_of_an_objective_with_no_steps_are_empty():
    """The shipped recipe trains no end-to-end steps: its card lists no means, not a crash."""
    assert tiny_recipe._tenths([]) == []
    assert tiny_recipe._tenths(list(range(20))) == [i + 0.5 for i in range(0, 20, 2)]


def test_recipe_file_is_the_shipped_defaults():
    """recipes/tiny.yaml and TinyRecipe's defaults describe the same (shipped) model."""
    assert tiny_recipe.load_recipe() == TinyRecipe()


def test_recipe_runs_end_to_end_and_its_card_compares_with_an_earlier_model(tmp_path):
    """Every stage at toy size; the card scores both held-out sets and the earlier model."""
    from marigold_model.loading import resolve_model_path
    earlier = resolve_model_path('bundled:marigold-tiny')
    lines = []
    figures = tiny_recipe.run(RECIPE, tmp_path / 'work', tmp_path / 'model', log=lines.append,
                              baseline_model=str(earlier))
    assert 0 < figures['vae_rgb_psnr_db'] < 100
    # Fewer than ten steps of each objective: one part per step.
    assert len(figures['unet_loss_by_tenth']) == RECIPE.unet_steps - RECIPE.affine_depth_steps
    assert len(figures['affine_loss_by_tenth']) == RECIPE.affine_depth_steps
    assert figures['total_s'] > 0
    card = (tmp_path / 'model' / 'README.md').read_text()
    for kind in tiny_recipe.EVAL_KINDS:
        assert f'`{kind}:2:{RECIPE.test_seed}:32`' in card
    assert card.count('previous model') == 2 * 2  # its table row and comparison, per set
    assert 'not measured' not in card
    assert any('held-out RGB PSNR' in line for line in lines)


@pytest.mark.parametrize('share, images', [(0.5, 8), (0.75, 12), (1.0, 16)])
def test_vae_batches_hold_the_rgb_share(share, images):
    """RGB rows (three different channels) come first, depth rows (one channel x 3) after."""
    from marigold_model.training.vae_training import _batch
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    depth = rng.uniform(-1, 1, (5, 8, 8)).astype(np.float32)
    batch = _batch(rgb, depth, rng, 16, share)
    grey = [bool((row[0] == row[1]).all() and (row[1] == row[2]).all()) for row in batch]
    assert grey == [False] * images + [True] * (16 - images)
