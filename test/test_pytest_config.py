"""The suite starts on a sourced ROS install, where launch_testing's pytest plugin is present."""

from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]


def _run_pytest(tmp_path, config):
    """Run pytest on one trivial test with a plugin shaped like launch_testing's installed."""
    site = tmp_path / 'site'
    dist = site / 'launch_testing-0.0.0.dist-info'
    dist.mkdir(parents=True, exist_ok=True)
    (dist / 'METADATA').write_text('Metadata-Version: 2.1\nName: launch_testing\nVersion: 0.0.0\n')
    (dist / 'entry_points.txt').write_text('[pytest11]\nlaunch_testing = old_hooks\n')
    # launch_testing.pytest.hooks before its pytest 9 backport: a py.path hook argument.
    (site / 'old_hooks.py').write_text(
        'def pytest_pycollect_makemodule(path, parent):\n    return None\n')
    (tmp_path / 'test_one.py').write_text('def test_one():\n    assert True\n')
    return subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-c', str(config),
         '--rootdir', str(tmp_path), str(tmp_path / 'test_one.py')],
        env={'PYTHONPATH': str(site), 'PATH': '/usr/bin:/bin'}, capture_output=True, text=True,
        timeout=120)


def test_the_old_launch_testing_plugin_does_not_stop_the_suite(tmp_path):
    """With the project's pytest config the suite runs; without it the plugin stops pytest."""
    empty = tmp_path / 'empty.ini'
    empty.write_text('[pytest]\n')
    without = _run_pytest(tmp_path, empty)
    assert without.returncode != 0 and 'PluginValidationError' in without.stderr + without.stdout
    with_config = _run_pytest(tmp_path, ROOT / 'setup.cfg')
    assert with_config.returncode == 0, with_config.stdout + with_config.stderr
    assert '1 passed' in with_config.stdout


def test_ros_scope_keeps_the_tests_that_touch_ros():
    """MARIGOLD_TEST_SCOPE=ros (.ci/run's second distribution) drops only ROS-free files."""
    from conftest import uses_ros
    here = ROOT / 'test'
    for name in ('test_depth_node.py', 'test_code_style.py', 'test_launch.py',
                 'test_bag_processor.py', 'test_geometry.py'):
        assert uses_ros(here / name), name
    for name in ('test_ensemble.py', 'test_trainer.py', 'test_estimator.py'):
        assert not uses_ros(here / name), name
    listed = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '--collect-only', str(here / 'test_ensemble.py'),
         str(here / 'test_geometry.py')], cwd=ROOT, capture_output=True, text=True,
        env={'MARIGOLD_TEST_SCOPE': 'ros', 'PATH': '/usr/bin:/bin'}, timeout=300)
    assert 'test_geometry.py::' in listed.stdout
    assert 'test_ensemble.py::' not in listed.stdout and 'deselected' in listed.stdout
