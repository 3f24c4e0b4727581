"""The demo's bundled camera sequence: its generator reproduces it."""

import json
from pathlib import Path

from builders import load_script
from marigold_ros.demo import load_sequence, SAMPLES
import numpy as np


def test_generator_reproduces_the_bundled_sequence(tmp_path):
    """Same settings, depth to the millimetre and the same sparse points; RGB up to JPEG."""
    load_script(Path(SAMPLES) / 'make_sample_sequence.py', 'make_sample_sequence').make_sequence(
        tmp_path)
    bundled, made = load_sequence(SAMPLES), load_sequence(tmp_path)
    assert json.loads((tmp_path / 'sequence.json').read_text()) == bundled.meta
    for index in range(bundled.meta['frames']):
        assert np.array_equal(np.isnan(made.depth[index]), np.isnan(bundled.depth[index]))
        assert np.nanmax(np.abs(made.depth[index] - bundled.depth[index])) <= 1e-3
        for ours, theirs in zip(made.sparse[index], bundled.sparse[index]):
            assert np.allclose(ours, theirs, rtol=1e-6)
        # JPEG encoders may round differently; another scene would differ by tens of levels.
        difference = np.abs(made.rgb[index].astype(float) - bundled.rgb[index])
        assert difference.mean() < 1.0
