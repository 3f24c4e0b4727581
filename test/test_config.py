"""Tests of the settings dataclasses' own checks and of the shared reason-carrying error."""

from dataclasses import replace
import math
import pickle

from marigold_model.alignment import AlignmentError
from marigold_model.config import (GUIDANCE_RANGES, GuidanceConfig, INFERENCE_RANGES,
                                   InferenceConfig, ModelConfig, override,
                                   PROCESSING_RESOLUTION_RANGE, resolve_processing_resolution)
from marigold_model.data.image_decoding import ImageConversionError
from marigold_model.errors import ReasonError
import pytest


@pytest.mark.parametrize('cls, name, value', [
    (ModelConfig, 'device', 'tpu'), (ModelConfig, 'dtype', 'int8'),
    (ModelConfig, 'vae', 'huge'), (ModelConfig, 'max_input_pixels', 0),
    (InferenceConfig, 'denoising_steps', -1), (InferenceConfig, 'ensemble_size', 0),
    (InferenceConfig, 'processing_resolution', PROCESSING_RESOLUTION_RANGE[0] - 1),
    (InferenceConfig, 'processing_resolution', PROCESSING_RESOLUTION_RANGE[1] + 1),
    (InferenceConfig, 'batch_size', 0), (InferenceConfig, 'warm_start_strength', 1.5),
    (InferenceConfig, 'ensemble_regularizer', float('inf')),
    (InferenceConfig, 'ensemble_max_iter', 0), (InferenceConfig, 'ensemble_tol', -1e-3),
    (InferenceConfig, 'ensemble_max_res', 0),
])
def test_a_bad_setting_is_refused_when_the_config_is_made(cls, name, value):
    """Construction, replace() and override() all run the one check, naming the field."""
    with pytest.raises(ValueError, match=name):
        cls(**{name: value})
    with pytest.raises(ValueError, match=name):
        replace(cls(), **{name: value})
    with pytest.raises(ValueError, match=name):
        override(cls(), **{name: value})


@pytest.mark.parametrize('cls, ranges, name', [
    (cls, ranges, name) for cls, ranges in ((InferenceConfig, INFERENCE_RANGES),
                                            (GuidanceConfig, GUIDANCE_RANGES))
    for name in sorted(ranges)])
def test_ranges_are_exactly_what_the_config_accepts(cls, ranges, name):
    """The ROS parameters publish these ranges: both ends make a config, a step past refuses."""
    low, high = ranges[name]
    for value in (low, high):
        assert getattr(cls(**{name: value}), name) == value
    outside = (low - 1, high + 1) if isinstance(low, int) else (
        math.nextafter(low, -math.inf), math.nextafter(high, math.inf), math.nan)
    for value in outside:
        with pytest.raises(ValueError, match=f'{name} must be within'):
            cls(**{name: value})


def test_processing_resolution_sentinels_resolve_once():
    """0 is the model's default, -1 the input size (None), anything else itself."""
    assert resolve_processing_resolution(InferenceConfig().processing_resolution, 768) == 768
    assert resolve_processing_resolution(-1, 768) is None
    assert resolve_processing_resolution(320, 768) == 320


@pytest.mark.parametrize('error, text', [
    (AlignmentError('empty_mask', 'no valid pixel'), 'empty_mask: no valid pixel'),
    (ImageConversionError('truncated', 'data has 3 bytes'), 'data has 3 bytes'),
    (ReasonError('zero_stamp', 'stamp is 0', key='/cam'), 'stamp is 0'),
])
def test_reason_errors_keep_reason_message_and_key_through_pickle(error, text):
    """Worker processes send these errors back pickled; nothing may be lost."""
    assert isinstance(error, ValueError) and str(error) == text
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == text
    assert (copy.reason, copy.message, copy.key) == (error.reason, error.message, error.key)
