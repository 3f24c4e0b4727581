"""Shared fixtures: a small random Marigold-architecture model built once per session."""

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
