"""Tests of evaluation (marigold_model.training): protocol, baselines, crops, readers, CLI."""

import json

from marigold_model.data.kitti import KittiEigen
from marigold_model.data.nyu import NyuLabeled, read_nyu_split
from marigold_model.data.sample import DatasetError, make_sample
from marigold_model.training.eval_datasets import crop_mask, eigen_crop_mask, garg_crop_mask
from marigold_model.training.eval_datasets import open_dataset, SYNTHETIC_EVAL_STREAM
from marigold_model.training.evaluate import BASELINES, evaluate, main, ramp_baseline
from marigold_model.training.evaluate import score_image
import numpy as np
from PIL import Image
import pytest

K = np.eye(3)


def _sample(depth, name, fill=0):
    depth = np.asarray(depth, dtype=np.float32)
    rgb = np.full(depth.shape + (3,), fill, dtype=np.uint8)
    return make_sample(rgb, depth, K, name)


# ---- protocol and aggregation --------------------------------------------------------------


def test_two_images_hand_computed():
    # Image A: the prediction is an affine map of the truth -> exact after alignment.
    # Image B: pred [0, 0, 1, 1] vs gt [1.9, 3.1, 2.5, 3.5]: mean p 0.5, mean gt 2.75,
    # cov 0.5, var 1 -> scale 0.5, shift 2.5, aligned [2.5, 2.5, 3, 3].
    # AbsRel_B = (0.6/1.9 + 0.6/3.1 + 0.5/2.5 + 0.5/3.5) / 4; delta1_B = 3/4 (2.5/1.9 > 1.25);
    # RMSE_B = sqrt((0.36 + 0.36 + 0.25 + 0.25) / 4). Depth is float32: tolerance 1e-6.
    samples = [_sample([[1.0, 2.0], [3.0, 4.0]], 'a', fill=0),
               _sample([[1.9, 3.1], [2.5, 3.5]], 'b', fill=1),
               _sample(np.zeros((2, 2)), 'empty', fill=2)]
    predictions = {0: np.array([[0.1, 0.3], [0.5, 0.7]]), 1: np.array([[0.0, 0.0], [1.0, 1.0]]),
                   2: np.ones((2, 2))}

    def predict(rgb):
        return predictions[int(rgb[0, 0, 0])]

    result = evaluate(predict, samples, min_depth=1e-3, max_depth=10.0, batch_size=2,
                      name='hand')
    abs_rel_b = (0.6 / 1.9 + 0.6 / 3.1 + 0.5 / 2.5 + 0.5 / 3.5) / 4
    assert result['predictor'] == 'hand'
    assert result['images'] == 2
    assert result['skipped'] == 1  # no valid ground truth at all
    assert result['abs_rel'] == pytest.approx(abs_rel_b / 2, abs=1e-6)
    assert result['delta1'] == pytest.approx((1.0 + 0.75) / 2)
    assert result['delta2'] == pytest.approx(1.0)
    assert result['rmse'] == pytest.approx(np.sqrt(0.305) / 2, abs=1e-6)
    assert result['abs_rel_per_image'] == pytest.approx([0.0, abs_rel_b], abs=1e-6)


def test_paired_comparison_by_hand():
    """Wins 2 of 3 images, mean difference -0.1; the bootstrap interval contains it."""
    from marigold_model.training.tiny_recipe import paired_comparison
    model = {'predictor': 'model', 'abs_rel_per_image': [0.1, 0.2, 0.2]}
    ramp = {'predictor': 'ramp', 'abs_rel_per_image': [0.2, 0.2, 0.4]}
    text = paired_comparison(model, ramp, resamples=2000)
    assert text.startswith('model has a lower AbsRel than ramp on 67% of the 3 images')
    assert 'mean AbsRel difference -0.1000' in text
    low, high = (float(v) for v in text.split('interval ')[1].rstrip(').').split(' to '))
    assert -0.2 <= low <= -0.1 <= high <= 0.0
    with pytest.raises(ValueError, match='same scored images'):
        paired_comparison(model, {'predictor': 'x', 'abs_rel_per_image': [0.1]})


def test_depth_range_and_crop_restrict_pixels():
    # The 100 m pixel is outside the 10 m range; the crop removes the right column.
    gt = np.array([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    pred = np.array([[0.0, 1.0, 9.0], [2.0, 3.0, 9.0]])  # exact on the first two columns
    sample = _sample(gt, 's')
    crop = np.array([[True, True, False], [True, True, False]])
    assert evaluate(lambda rgb: pred, [sample], 1e-3, 10.0, crop)['abs_rel'] < 1e-9
    assert evaluate(lambda rgb: pred, [sample], 1e-3, 200.0)['abs_rel'] > 0.05


def test_evaluate_rejects_wrong_prediction_shape():
    with pytest.raises(ValueError, match='shape'):
        evaluate(lambda rgb: np.zeros((3, 3)), [_sample(np.ones((2, 2)), 'x')], 1e-3, 10.0)


def test_evaluate_stops_on_a_prediction_with_holes():
    """A NaN prediction is the predictor failing: it is not left out of the mean."""
    def holes(rgb):
        out = np.ones(rgb.shape[:2])
        out[0, 0] = np.nan
        return out

    with pytest.raises(ValueError, match='x: .*NaN or inf on 1 of'):
        evaluate(holes, [_sample(np.full((2, 2), 2.0), 'x')], 1e-3, 10.0)


def test_evaluate_raises_when_nothing_scored():
    with pytest.raises(ValueError, match='none of 1 images'):
        evaluate('ramp', [_sample(np.zeros((4, 4)), 'x')], 1e-3, 10.0)


# ---- baselines -----------------------------------------------------------------------------


def test_ramp_runs_from_near_bottom_to_far_top():
    ramp = ramp_baseline(np.zeros((5, 3, 3), np.uint8))
    assert ramp.shape == (5, 3)
    assert np.allclose(ramp[:, 0], [1.0, 0.75, 0.5, 0.25, 0.0])
    assert np.all(ramp == ramp[:, :1])


def test_ramp_exact_on_a_ramp_and_constant_is_the_mean():
    height, width = 8, 6
    rows = np.arange(height)[:, None]
    gt = np.repeat(1.0 + 4.0 * (height - 1 - rows) / (height - 1), width, axis=1)
    samples = [_sample(gt, 'ramp')]
    ramp = evaluate('ramp', samples, 1e-3, 10.0)
    constant = evaluate('constant', samples, 1e-3, 10.0)
    assert ramp['abs_rel'] < 1e-6
    assert ramp['delta1'] == 1.0
    mean = gt.mean()
    assert constant['abs_rel'] == pytest.approx(np.mean(np.abs(mean - gt) / gt))
    assert constant['abs_rel'] > 0.2


def test_constant_prediction_scored_as_best_constant():
    # gt [1, 2, 3, 6] -> mean 3 -> AbsRel (2/1 + 1/2 + 0 + 3/6) / 4 = 0.75, delta1 = 1/4.
    gt = np.array([[1.0, 2.0], [3.0, 6.0]])
    result = score_image(np.full((2, 2), 0.3), gt, np.ones((2, 2), bool), 1e-3, 10.0)
    assert result['scale'] == 0.0
    assert result['shift'] == pytest.approx(3.0)
    assert result['abs_rel'] == pytest.approx(0.75)
    assert result['delta1'] == pytest.approx(0.25)
    assert evaluate('constant', [_sample(gt, 'c')], 1e-3, 10.0)['abs_rel'] == pytest.approx(0.75)


def test_unknown_baseline_rejected():
    with pytest.raises(ValueError, match='unknown baseline'):
        evaluate('zeros', [_sample(np.ones((2, 2)), 'x')], 1e-3, 10.0)


# ---- crops ---------------------------------------------------------------------------------


def test_eigen_crop_at_nyu_size():
    mask = eigen_crop_mask(480, 640)
    assert mask.sum() == (471 - 45) * (601 - 41)
    assert mask[45, 41] and mask[470, 600]
    assert not mask[44, 41] and not mask[45, 40] and not mask[471, 600] and not mask[470, 601]


def test_eigen_crop_scales_with_size():
    mask = eigen_crop_mask(240, 320)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (23, 236, 21, 301)


def test_garg_crop_at_kitti_size():
    mask = garg_crop_mask(375, 1242)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    # int(0.40810811 * 375) = 153, int(0.99189189 * 375) = 371,
    # int(0.03594771 * 1242) = 44, int(0.96405229 * 1242) = 1197
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (153, 371, 44, 1197)
    assert mask.sum() == (371 - 153) * (1197 - 44)


def test_crop_mask_settings():
    assert crop_mask(None, 3, 4).all()
    assert crop_mask(lambda h, w: np.eye(h, w, dtype=bool), 3, 4).sum() == 3
    with pytest.raises(ValueError, match='unknown crop'):
        crop_mask('center', 3, 4)
    with pytest.raises(ValueError, match='shape'):
        crop_mask(np.ones((2, 2), bool), 3, 4)


# ---- NYUv2 ---------------------------------------------------------------------------------


def _write_nyu(path, count=3, height=6, width=8):
    """Write a labeled .mat in the real layout: images [N, 3, W, H], depths [N, W, H]."""
    import h5py
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 9.0, (count, height, width)).astype(np.float32)
    with h5py.File(path, 'w') as stream:
        stream['images'] = rgb.transpose(0, 3, 2, 1)
        stream['depths'] = depth.transpose(0, 2, 1)
    return rgb, depth


def test_nyu_reader_undoes_transposed_layout(tmp_path):
    from scipy.io import savemat
    rgb, depth = _write_nyu(tmp_path / 'nyu.mat')
    savemat(tmp_path / 'splits.mat', {'testNdxs': np.array([[1.0], [3.0]]),
                                      'trainNdxs': np.array([[2.0]])})
    assert list(read_nyu_split(tmp_path / 'splits.mat')) == [0, 2]
    dataset = open_dataset(f'nyu:{tmp_path / "nyu.mat"}:{tmp_path / "splits.mat"}')
    try:
        assert len(dataset) == 2
        assert (dataset.crop, dataset.min_depth, dataset.max_depth) == ('eigen', 1e-3, 10.0)
        second = dataset.samples[1]
        assert second.name == 'nyu_0003'
        assert second.rgb.shape == (6, 8, 3)
        assert np.array_equal(second.rgb, rgb[2])
        assert np.allclose(second.depth, depth[2])
    finally:
        dataset.close()
    reader = NyuLabeled(tmp_path / 'nyu.mat')
    assert len(reader) == 3 and np.array_equal(reader[0].rgb, rgb[0])
    reader.close()


def test_nyu_split_in_hdf5_format(tmp_path):
    import h5py
    with h5py.File(tmp_path / 'splits.mat', 'w') as stream:
        stream['testNdxs'] = np.array([[2.0, 3.0]])
    assert list(read_nyu_split(tmp_path / 'splits.mat')) == [1, 2]


def test_nyu_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match='not found'):
        open_dataset(f'nyu:{tmp_path / "missing.mat"}')
    (tmp_path / 'text.mat').write_text('not hdf5')
    with pytest.raises(DatasetError, match='HDF5'):
        NyuLabeled(tmp_path / 'text.mat')
    _write_nyu(tmp_path / 'nyu.mat')
    from scipy.io import savemat
    savemat(tmp_path / 'splits.mat', {'testNdxs': np.array([[4.0]])})
    with pytest.raises(DatasetError, match='out of range'):
        open_dataset(f'nyu:{tmp_path / "nyu.mat"}:{tmp_path / "splits.mat"}')


# ---- KITTI ---------------------------------------------------------------------------------


def _write_kitti(root, name, raw_depth):
    (root / 'rgb').mkdir(exist_ok=True)
    (root / 'depth').mkdir(exist_ok=True)
    height, width = raw_depth.shape
    rgb = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)
    Image.fromarray(rgb).save(root / 'rgb' / f'{name}.png')
    Image.fromarray(raw_depth.astype(np.uint16)).save(root / 'depth' / f'{name}.png')
    return rgb


def test_kitti_reader_scales_png_and_skips_missing_ground_truth(tmp_path):
    raw = np.array([[0, 256, 512, 1000, 0], [2560, 20480, 0, 65535, 128]], dtype=np.uint16)
    rgb = _write_kitti(tmp_path, 'a', raw)
    split = tmp_path / 'split.txt'
    split.write_text('rgb/a.png depth/a.png 700.5\nrgb/b.png None 721.5\n\n')
    reader = KittiEigen(tmp_path, split)
    assert len(reader) == 1 and reader.no_ground_truth == 1
    sample = reader[0]
    assert np.array_equal(sample.rgb, rgb)
    assert np.allclose(sample.depth, raw / 256.0)
    assert np.array_equal(sample.valid, raw > 0)
    assert sample.K[0, 0] == 700.5 and sample.K[1, 1] == 700.5
    dataset = open_dataset(f'kitti:{tmp_path}:{split}')
    assert (dataset.crop, dataset.min_depth, dataset.max_depth) == ('garg', 1e-5, 80.0)
    assert dataset.info['no_ground_truth'] == 1


def test_kitti_missing_files_reported(tmp_path):
    _write_kitti(tmp_path, 'a', np.ones((2, 2)))
    split = tmp_path / 'split.txt'
    split.write_text('rgb/a.png depth/a.png\nrgb/c.png depth/c.png\n')
    with pytest.raises(DatasetError, match='c.png'):
        KittiEigen(tmp_path, split)
    with pytest.raises(DatasetError, match='split file not found'):
        open_dataset(f'kitti:{tmp_path}:{tmp_path / "nope.txt"}')


# ---- other data sets -----------------------------------------------------------------------


def test_synthetic_set_is_deterministic_and_not_a_training_scene():
    from marigold_model.data.synthetic import SyntheticDataset
    first = open_dataset('synthetic:2:5')
    again = open_dataset('synthetic:2:5')
    assert len(first) == 2 and first.crop is None
    assert np.array_equal(first.samples[1].depth, again.samples[1].depth)
    for sample in first.samples:
        values = sample.depth[sample.valid]
        assert first.min_depth < values.min() and values.max() < first.max_depth
    assert SYNTHETIC_EVAL_STREAM != 0
    training = SyntheticDataset(length=1, seed=5)[0]
    assert not np.array_equal(first.samples[0].rgb, training.rgb)


def test_basic_synthetic_set_is_the_same_scenes_without_the_hard_cases():
    from marigold_model.data.synthetic import NO_HARD_CASES, render_scene, SceneConfig
    basic = open_dataset('synthetic-basic:6:5:32').samples
    hard = open_dataset('synthetic:6:5:32').samples
    for i, sample in enumerate(basic):
        rng = np.random.default_rng([5, i, SYNTHETIC_EVAL_STREAM])
        alone = render_scene(rng, SceneConfig(**NO_HARD_CASES), 32, 32)
        assert np.array_equal(sample.rgb, alone.rgb) and np.array_equal(sample.depth, alone.depth)
    # The same base scenes (camera, room): the hard cases change some of them.
    assert all(np.array_equal(a.K, b.K) for a, b in zip(basic, hard))
    assert sum(not np.array_equal(a.rgb, b.rgb) for a, b in zip(basic, hard)) >= 3


def test_folder_dataset(tmp_path):
    (tmp_path / 'rgb').mkdir()
    (tmp_path / 'depth').mkdir()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / 'rgb' / 'f.png')
    Image.fromarray(np.full((4, 5), 1500, np.uint16)).save(tmp_path / 'depth' / 'f.png')
    dataset = open_dataset(f'folder:{tmp_path}', max_depth=20.0)
    assert len(dataset) == 1 and dataset.max_depth == 20.0 and dataset.crop is None
    assert np.allclose(dataset.samples[0].depth, 1.5)


@pytest.mark.parametrize('spec', ['mars:1', 'synthetic:x:1', 'synthetic:2', 'kitti:only_root',
                                  'synthetic:2:1:4', 'synthetic-basic:2'])
def test_bad_specs_rejected(spec):
    with pytest.raises(DatasetError):
        open_dataset(spec)


# ---- command line --------------------------------------------------------------------------


def test_cli_end_to_end_with_random_tiny_model(tmp_path, capsys):
    from marigold_model.architecture import build_random_marigold, TinyArchitecture
    model = build_random_marigold(tmp_path / 'model', TinyArchitecture(
        unet_channels=(32, 64), vae_channels=(32, 32, 32), text_dim=32))
    out = tmp_path / 'out'
    code = main(['--model', str(model), '--dataset', 'synthetic:4:123', '--device', 'cpu',
                 '--baselines', '--output', str(out), '--quiet'])
    assert code == 0
    assert (out / 'results.json').is_file() and (out / 'results.md').is_file()
    report = json.loads((out / 'results.json').read_text())
    assert report['dataset'] == 'synthetic:4:123'
    assert report['model']['steps'] == 1 and report['model']['ensemble'] == 1
    names = [row['predictor'] for row in report['results']]
    assert names[1:] == list(BASELINES) and names[0].startswith('model')
    for row in report['results']:
        assert row['images'] == 4
        assert 0.0 <= row['abs_rel'] < 5.0
        assert 0.0 <= row['delta1'] <= 1.0
        assert np.isfinite(row['rmse'])
    markdown = (out / 'results.md').read_text()
    assert '| predictor | AbsRel | delta1 | images |' in markdown
    assert '| ramp |' in markdown
    assert '| ramp |' in capsys.readouterr().out


def test_cli_reports_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['--dataset', f'nyu:{tmp_path / "absent.mat"}', '--baselines-only'])
    assert exit_info.value.code == 2
    assert 'absent.mat' in capsys.readouterr().err


def test_cli_rejects_bad_settings_before_loading(capsys):
    with pytest.raises(SystemExit):
        main(['--dataset', 'synthetic:1:1', '--ensemble', '0', '--model', '/nonexistent'])
    assert 'ensemble_size' in capsys.readouterr().err


def test_cli_names_its_resolution_and_warns_when_it_upsamples(tmp_path, capsys):
    """A resolution above twice the images' longer side is named and warned about."""
    from marigold_model.architecture import build_random_marigold, TinyArchitecture
    model = build_random_marigold(tmp_path / 'model', TinyArchitecture(
        unet_channels=(32, 64), vae_channels=(32, 32, 32), text_dim=32,
        processing_resolution=128))
    common = ['--model', str(model), '--dataset', 'synthetic:1:7:32', '--device', 'cpu',
              '--quiet']
    assert main(common) == 0  # the model's default, 128 px, on 32 px images: 4x
    err = capsys.readouterr().err
    assert "processing resolution 128 px (longer side, the model's default)" in err
    assert 'warning' in err and '32 px' in err and '4.0x' in err
    assert '--resolution -1' in err and '--resolution 32' in err
    assert main(common + ['--resolution', '64']) == 0  # 2x: no warning
    err = capsys.readouterr().err
    assert 'processing resolution 64 px (longer side, --resolution)' in err
    assert 'warning' not in err
    assert main(common + ['--resolution', '-1']) == 0
    err = capsys.readouterr().err
    assert 'the input size' in err and 'warning' not in err


def test_cli_backend_flag_scores_an_onnx_export_like_torch(tmp_path, capsys):
    """--backend onnxruntime (default from ModelConfig: torch) gives torch's scores."""
    pytest.importorskip('onnxruntime')
    from marigold_model.config import ModelConfig
    from marigold_model.onnx_export import export_onnx
    from marigold_model.training.evaluate import build_parser
    assert build_parser().parse_args(['--dataset', 'x']).backend == ModelConfig().backend
    export = export_onnx('bundled:marigold-tiny', tmp_path / 'onnx')
    reports = {}
    for backend, model in (('torch', 'bundled:marigold-tiny'), ('onnxruntime', str(export))):
        assert main(['--model', model, '--backend', backend, '--dataset', 'synthetic:2:5:32',
                     '--device', 'cpu', '--steps', '1', '--output', str(tmp_path / backend),
                     '--quiet']) == 0
        reports[backend] = json.loads((tmp_path / backend / 'results.json').read_text())
    torch_row, onnx_row = (reports[b]['results'][0] for b in ('torch', 'onnxruntime'))
    assert onnx_row['images'] == torch_row['images'] == 2
    for metric in ('abs_rel', 'delta1', 'rmse'):
        assert onnx_row[metric] == pytest.approx(torch_row[metric], rel=1e-3, abs=1e-4)
    with pytest.raises(SystemExit):
        main(['--dataset', 'synthetic:1:1', '--backend', 'tensorflow'])
    assert 'onnxruntime' in capsys.readouterr().err
