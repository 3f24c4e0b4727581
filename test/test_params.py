"""Tests of marigold_ros.params (dataclasses <-> ROS parameters) and config/depth.yaml."""

from dataclasses import dataclass
from pathlib import Path

from marigold_ros.node_params import parameter_groups
from marigold_ros.params import check_unique, ConfigGroup, field_descriptions
import pytest
from rcl_interfaces.msg import ParameterType
from rclpy.node import Node
from rclpy.parameter import Parameter
import yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Example:
    """
    A config to test the mechanism.

    :param documented: from the docstring
        over two lines
    """

    documented: int = 3
    # from the comment above
    above: float = 0.5
    trailing: str = 'a'  # from the trailing comment
    flag: bool = True
    sizes: tuple = (1.0, 2.0)
    names: tuple = ('x',)
    undocumented: int = 1

    def __post_init__(self):
        """Reject a negative above."""
        if self.above < 0:
            raise ValueError('above must be >= 0')


def _group(**kwargs):
    return ConfigGroup(Example, ranges={'documented': (0, 10), 'above': (0.0, 1.0)},
                       choices={'trailing': ('a', 'b')}, **kwargs)


def test_field_descriptions_from_docstring_and_comments():
    """Docstring :param: entries, comments above and trailing comments are found."""
    docs = field_descriptions(Example)
    assert docs['documented'] == 'from the docstring over two lines'
    assert docs['above'] == 'from the comment above'
    assert docs['trailing'] == 'from the trailing comment'
    assert 'undocumented' not in docs


def test_descriptors_types_ranges_choices_read_only():
    """Types follow the defaults; ranges, choices and read-only end up in the descriptor."""
    group = _group(read_only_fields=('flag',))
    kinds = {name: group.descriptor(name, getattr(Example(), name)) for name in
             ('documented', 'above', 'trailing', 'flag', 'sizes', 'names')}
    assert kinds['documented'].type == ParameterType.PARAMETER_INTEGER
    assert kinds['documented'].integer_range[0].to_value == 10
    assert kinds['above'].floating_point_range[0].from_value == 0.0
    assert kinds['above'].dynamic_typing  # integers accepted for doubles
    assert kinds['sizes'].type == ParameterType.PARAMETER_DOUBLE_ARRAY
    assert kinds['names'].type == ParameterType.PARAMETER_STRING_ARRAY
    assert 'one of: a, b' in kinds['trailing'].additional_constraints
    assert kinds['flag'].read_only and not kinds['documented'].read_only
    assert kinds['documented'].description.startswith('from the docstring')
    assert group.descriptor('undocumented', 1).description.startswith('undocumented')


def test_build_validates_and_converts():
    """Ranges, choices and the dataclass' own checks raise ValueError; types convert."""
    group = _group()
    config = group.build({'above': 1, 'sizes': [3.0], 'names': ['p', 'q']})
    assert config.above == 1.0 and isinstance(config.above, float)
    assert config.sizes == (3.0,) and config.names == ('p', 'q')
    for values, text in [({'documented': 11}, 'documented'), ({'trailing': 'c'}, 'trailing'),
                         ({'above': 'high'}, 'above'), ({'nope': 1}, 'nope')]:
        with pytest.raises(ValueError, match=text):
            group.build(values)
    with pytest.raises(ValueError, match='above must be'):
        ConfigGroup(Example).build({'above': -1.0})


def test_unknown_names_and_duplicates_refused():
    """Ranges on unknown fields and duplicate parameter names across groups are errors."""
    with pytest.raises(ValueError, match='unknown fields'):
        ConfigGroup(Example, ranges={'missing': (0, 1)})
    with pytest.raises(ValueError, match='exposed by both'):
        check_unique([ConfigGroup(Example), ConfigGroup(Example)])
    check_unique([ConfigGroup(Example), ConfigGroup(Example, prefix='other.')])


def test_declare_on_a_node_with_overrides_and_runtime_changes(context):
    """Overrides reach the config; rclpy enforces ranges and read-only at runtime."""
    overrides = [Parameter('documented', value=7), Parameter('ex.above', value=1),
                 Parameter('ex.names', value=['u', 'v']),
                 Parameter('ex.sizes', value=[0, 3])]  # '-p ex.sizes:=[0,3]': integers
    node = Node('params_test', context=context, parameter_overrides=overrides)
    try:
        flat = _group(read_only_fields=('flag',)).declare(node)
        prefixed = _group(prefix='ex.', read_only=True).declare(node)
        assert flat.documented == 7 and prefixed.above == 1.0
        assert prefixed.names == ('u', 'v')
        assert prefixed.sizes == (0.0, 3.0) and all(type(v) is float for v in prefixed.sizes)
        assert not node.set_parameters([Parameter('documented', value=11)])[0].successful
        assert not node.set_parameters([Parameter('flag', value=False)])[0].successful
        assert not node.set_parameters([Parameter('ex.documented', value=1)])[0].successful
        assert node.set_parameters([Parameter('documented', value=9)])[0].successful
        changed, touched = _group().apply(flat, [Parameter('documented', value=9),
                                                 Parameter('unrelated', value=1)])
        assert touched and changed.documented == 9
        assert _group().apply(flat, [Parameter('unrelated', value=1)]) == (flat, False)
        assert node.describe_parameter('ex.above').read_only
    finally:
        node.destroy_node()


def test_node_parameter_groups_documented_and_unique():
    """Every node parameter has its own description and the names do not collide."""
    groups = parameter_groups()
    check_unique(groups)
    for group in groups:
        for f in group.fields():
            text = group.description(f.name)
            assert text != f.name.replace('_', ' '), f'{group.cls.__name__}.{f.name}'
    names = [n for g in groups for n in g.names()]
    for expected in ('model', 'device', 'denoising_steps', 'ensemble_size',
                     'processing_resolution', 'fixed_scale', 'cameras', 'input_reliability',
                     'camera_info_tolerance'):
        assert expected in names
    runtime = {n for g in groups for n in g.names() if not g.is_read_only(g.names()[n])}
    assert {'denoising_steps', 'ensemble_size', 'processing_resolution'} <= runtime
    assert 'model' not in runtime and 'max_input_pixels' not in runtime


def _flatten(tree, prefix=''):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f'{prefix}{key}.'))
        else:
            out[prefix + key] = value
    return out


def test_config_yaml_lists_every_parameter_with_its_default():
    """config/depth.yaml holds every parameter, at its default, and nothing else."""
    document = yaml.safe_load((ROOT / 'config' / 'depth.yaml').read_text())
    values = _flatten(document['/**']['ros__parameters'])
    expected = {}
    for group in parameter_groups():
        defaults = group.defaults()
        for name, field_name in group.names().items():
            value = getattr(defaults, field_name)
            expected[name] = list(value) if isinstance(value, tuple) else value
    assert set(values) == set(expected)
    for name, value in expected.items():
        assert values[name] == value, name


@pytest.mark.parametrize('name, value, text', [
    ('ensemble_size', 'three', "ensemble_size must be an integer, got string 'three'"),
    ('ensemble_size', 2.5, 'ensemble_size must be an integer, got number 2.5'),
    ('fixed_scale', 'x', "fixed_scale must be a number, got string 'x'"),
    ('warmup', 'yes', "warmup must be a boolean (true or false), got string 'yes'"),
    ('lazy_outputs', 1, 'lazy_outputs must be a boolean (true or false), got integer 1'),
    ('model', 3, 'model must be a string, got integer 3'),
    ('cameras', 'left', "cameras must be a list, got string 'left'"),
    ('cameras', ['left', 2], "cameras must be a list of strings, got list ['left', 2]"),
    ('scale_recovery.source', True, 'scale_recovery.source must be a string, got boolean'),
])
def test_type_errors_name_the_expected_type(name, value, text):
    """A value of the wrong type (params file, launch argument) says what was expected."""
    from marigold_ros.node_params import configs_from_parameters
    with pytest.raises(ValueError) as error:
        configs_from_parameters({name: value})
    assert str(error.value).startswith(text), str(error.value)
    # Integers stay welcome where a float is expected.
    assert configs_from_parameters({'fixed_scale': 2})
