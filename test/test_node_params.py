"""Tests of marigold_ros.node_params: the output table, topic joining, the config stitch."""

from dataclasses import fields

from marigold_model.config import InferenceConfig, ModelConfig
from marigold_ros.bag_io import CAMERA_INFO_TYPE, IMAGE_TYPE, POINTCLOUD_TYPE
from marigold_ros.bag_job import BagJob, build_parser, job_from_args
from marigold_ros.diagnostics import KeyedThrottle
from marigold_ros.node_params import DEFAULT_OUTPUT_NAMES, estimator_config, join_topic
from marigold_ros.node_params import OUTPUT_NAMES
from marigold_ros.node_params import OUTPUT_TOPICS, OutputConfig, read_node_params
from marigold_ros.pipeline import FrameOutput
import pytest


def test_output_table_names_topics_and_types():
    """One row per FrameOutput message, with the topics and bag types of DESIGN.md."""
    assert OUTPUT_NAMES == ('relative', 'metric', 'uncertainty', 'camera_info', 'points',
                            'colored')
    assert all(hasattr(FrameOutput(header=None), name) for name in OUTPUT_NAMES)
    table = {o.name: (o.topic, o.msgtype) for o in OUTPUT_TOPICS}
    assert table == {'relative': ('depth/relative', IMAGE_TYPE),
                     'metric': ('depth/image', IMAGE_TYPE),
                     'uncertainty': ('depth/uncertainty', IMAGE_TYPE),
                     'camera_info': ('depth/camera_info', CAMERA_INFO_TYPE),
                     'points': ('depth/points', POINTCLOUD_TYPE),
                     'colored': ('depth/colored', IMAGE_TYPE)}
    # depth/colored is a picture for people: built only when asked for (process_bag's
    # output stays as it was).
    assert DEFAULT_OUTPUT_NAMES == frozenset(OUTPUT_NAMES) - {'colored'}


@pytest.mark.parametrize('namespace, expected', [
    ('', 'depth/points'), ('left', 'left/depth/points'), ('left/', 'left/depth/points'),
    ('/cam', '/cam/depth/points'), ('/', '/depth/points'), (None, 'depth/points')])
def test_join_topic(namespace, expected):
    """'' keeps the name relative, '/' puts it at the root, a trailing '/' is dropped."""
    assert join_topic(namespace, 'depth/points') == expected


def test_estimator_config_takes_the_pixel_limit_from_the_outputs():
    """The model refuses what the node refuses: max_input_pixels comes from OutputConfig."""
    inference = InferenceConfig(ensemble_size=2)
    config = estimator_config(ModelConfig(model='m', max_input_pixels=10 ** 6), inference,
                              OutputConfig(max_input_pixels=1234))
    assert config.model.max_input_pixels == 1234 and config.model.model == 'm'
    assert config.inference is inference


def test_read_node_params_without_a_file_gives_the_defaults():
    """No params file: every config at its dataclass default."""
    configs = read_node_params(None)
    assert configs[OutputConfig] == OutputConfig()
    assert configs[InferenceConfig] == InferenceConfig()


def test_command_line_defaults_are_the_bag_job_defaults():
    """Only the two positional arguments given: the job is BagJob's defaults."""
    job = job_from_args(build_parser().parse_args(['in', 'out']))
    assert job == BagJob(input='in', output='out')
    given = job_from_args(build_parser().parse_args(
        ['in', 'out', '--lookahead', '2.5', '--batch', '4', '--storage', 'sqlite3',
         '--no-points']))
    assert (given.lookahead_s, given.batch, given.storage, given.no_points) == \
        (2.5, 4, 'sqlite3', True)
    assert {f.name for f in fields(BagJob)} <= set(vars(build_parser().parse_args(['a', 'b'])))


def test_throttled_report_counts_what_it_held_back():
    """One line per key and period; the next one says how many were held back."""
    throttle = KeyedThrottle(5.0)
    assert throttle.report('k', 'bad', now=0.0) == 'bad'
    assert throttle.report('k', 'bad', now=1.0) is None
    assert throttle.report('k', 'bad', now=2.0) is None
    assert throttle.report('other', 'worse', now=2.0) == 'worse'
    assert throttle.report('k', 'bad', now=6.0) == 'bad (2 more since the last report)'
