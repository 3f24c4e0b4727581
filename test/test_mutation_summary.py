"""bench/mutation_summary.py: the score counts only killed and reviewed mutants."""

from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))

from mutation_summary import summarise  # noqa: E402 - bench/ is not a package


def test_timeouts_are_open_unless_explained():
    """A timeout is not a kill: it is listed for review, or explained like a survivor."""
    lines = ['    marigold_model.ensemble.x_f__mutmut_1: killed',
             '    marigold_model.ensemble.x_f__mutmut_2: timeout',
             '    marigold_model.ensemble.x_f__mutmut_3: timeout',
             '    marigold_model.ensemble.x_f__mutmut_4: survived',
             '    marigold_model.ensemble.x_f__mutmut_5: survived',
             '    marigold_model.ensemble.x_f__mutmut_6: not checked']
    explained = {'marigold_model.ensemble.x_f__mutmut_3': 'reviewed',
                 'marigold_model.ensemble.x_f__mutmut_5': 'reviewed'}
    counts, open_ones = summarise(lines, explained)
    module = counts['marigold_model.ensemble']
    assert dict(module) == {'killed': 1, 'timeout': 1, 'equivalent': 2, 'survived': 1}
    assert open_ones == ['marigold_model.ensemble.x_f__mutmut_2 (timeout)',
                         'marigold_model.ensemble.x_f__mutmut_4 (survived)']


def test_estimator_mutants_outside_the_schedule_are_ignored():
    """Only the estimator's schedule and DDIM step are in scope."""
    lines = ['    marigold_model.estimator.xǁDepthEstimatorǁ_schedule__mutmut_1: survived',
             '    marigold_model.estimator.xǁDepthEstimatorǁ_preprocess__mutmut_1: survived']
    counts, open_ones = summarise(lines, {})
    assert sum(counts['marigold_model.estimator'].values()) == 1
    assert open_ones == ['marigold_model.estimator.xǁDepthEstimatorǁ_schedule__mutmut_1 '
                         '(survived)']
