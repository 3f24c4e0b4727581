"""The demo end to end: the bundled tiny model through the node on the sample sequence."""

import json
from pathlib import Path

from builders import load_script
from marigold_model.loading import BUNDLED_DIR
from marigold_model.scale_tracking import ScaleTrackerConfig
from marigold_ros.demo import main, SAMPLES, TINY_INLIER_THRESHOLD


def test_demo_publishes_every_frame_and_beats_a_constant_depth(tmp_path):
    """Every frame is handled, and the metric depth is better than a constant depth."""
    # The model is part of the repository (it was a skip: a checkout without it must fail).
    assert (BUNDLED_DIR / 'marigold-tiny' / 'model_index.json').is_file(), \
        'bundled model missing: restore marigold_model/models/marigold-tiny or make train-tiny'
    (tmp_path / 'frame_0099.png').write_bytes(b'an earlier run')
    assert main(['--output', str(tmp_path), '--device', 'cpu']) == 0
    assert not (tmp_path / 'frame_0099.png').exists()
    summary = json.loads((tmp_path / 'summary.json').read_text())
    frames, accuracy = summary['frames'], summary['accuracy']
    # The node drops a frame that arrives while the model is busy (a loaded machine).
    assert frames['published'] + frames['dropped'] == frames['sent']
    assert frames['published'] == accuracy['frames'] >= frames['sent'] // 2
    assert summary['metric_scale']['scale_status'] == 'ok'
    assert summary['settings']['scale_recovery.inlier_threshold_rel'] == TINY_INLIER_THRESHOLD
    # A scale fit that only places a flat surface at the median sparse depth would score
    # like the constant baseline; the fit must use the relative depth's structure.
    assert accuracy['metric_abs_rel'] < 0.9 * accuracy['constant_median_sparse_abs_rel']
    for name in summary['files']:
        assert (tmp_path / name).stat().st_size > 0


def test_demo_plays_another_sequence_with_the_given_threshold(tmp_path):
    """--samples plays a generated room; --inlier-threshold reaches the node, else its default."""
    load_script(Path(SAMPLES) / 'make_sample_sequence.py', 'make_sample_sequence').make_sequence(
        tmp_path / 'room', {'scene_seed': 2, 'frames': 3})
    # The bundled weights by path: not the bundled name, so the node's default threshold.
    model = str(BUNDLED_DIR / 'marigold-tiny')
    for threshold, expected in ((None, ScaleTrackerConfig.inlier_threshold_rel), (0.25, 0.25)):
        output = tmp_path / f'demo_{threshold}'
        argv = ['--output', str(output), '--device', 'cpu', '--model', model,
                '--samples', str(tmp_path / 'room')]
        assert main(argv + ([] if threshold is None else ['--inlier-threshold', '0.25'])) == 0
        summary = json.loads((output / 'summary.json').read_text())
        assert summary['frames']['sent'] == 3
        assert summary['settings']['scale_recovery.inlier_threshold_rel'] == expected
