"""Shared fixtures: a tiny random model, scenes, one torch thread, an rclpy context."""

import os

import pytest

# Keep DDS traffic of test runs on this host and away from other runs.
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'OFF')


@pytest.fixture(scope='session')
def random_model_dir(tmp_path_factory):
    """
    Save a randomly initialised tiny Marigold model (tests only, never the demo).

    :param tmp_path_factory: pytest's session temporary folders
    :return: path of the model folder as str
    """
    from marigold_model.architecture import build_random_marigold, TinyArchitecture
    path = tmp_path_factory.mktemp('random_marigold')
    arch = TinyArchitecture(unet_channels=(32, 64), vae_channels=(32, 32, 32), text_dim=32,
                            processing_resolution=64, denoising_steps=2)
    build_random_marigold(path, arch, seed=0)
    return str(path)


@pytest.fixture(scope='module')
def scenes():
    """Render six frames of one synthetic scene seen from an orbiting camera (builders)."""
    from builders import orbit_scenes
    return orbit_scenes()


@pytest.fixture(scope='module')
def one_torch_thread():
    """
    Run a module's tiny models on one thread (restored afterwards).

    On the shared 2-core test machine two torch threads contending with other jobs made the
    tiny model 5-30x slower than one thread.  The last bits of a model call depend on the
    thread count: test_bag_reference's digests were made on one thread, and process_bags'
    one-thread workers are compared with references made here.
    """
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def context():
    """Return an rclpy context of its own for the module."""
    import rclpy
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


# ------------------------------------------------------------------ MARIGOLD_TEST_SCOPE=ros

# What a test file uses of a ROS distribution, directly or through the helpers in test/.
ROS_MODULES = ('rclpy', 'rosidl', 'rcl_interfaces', 'builtin_interfaces', 'launch',
               'launch_ros', 'ament_', 'marigold_ros', 'lifecycle_msgs')


def _imports(text):
    import ast
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def uses_ros(path, seen=None):
    """Tell whether a test file imports ROS (or marigold_ros), or runs ament_flake8."""
    seen = set() if seen is None else seen
    if path in seen:
        return False
    seen.add(path)
    text = path.read_text(encoding='utf-8')
    if 'ament_flake8' in text:  # run as a program
        return True
    for name in _imports(text):
        if name.startswith(ROS_MODULES) or name.split('.')[0].endswith('_msgs'):
            return True
        helper = path.parent / (name.split('.')[0] + '.py')
        if helper.is_file() and uses_ros(helper, seen):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """
    With MARIGOLD_TEST_SCOPE=ros run only the tests that touch ROS.

    ``.ci/run`` sets it for its second ROS distribution: the venvs differ only in their ROS
    wheels, so the ROS-free tests (the model, training, torch.compile) ran in the first.
    """
    import os
    from pathlib import Path
    if os.environ.get('MARIGOLD_TEST_SCOPE', 'all') != 'ros':
        return
    verdicts = {}
    keep, drop = [], []
    for item in items:
        path = Path(str(item.fspath))
        if path not in verdicts:
            verdicts[path] = uses_ros(path)
        (keep if verdicts[path] else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
