"""
Which package may import which, read from the source with ast (every import, also in functions).

marigold_model runs without ROS; its inference side (everything outside
marigold_model/training) runs without the training code.  In marigold_ros the live node and
the offline bag tools sit side by side on the shared stages: neither imports the other, the
pipeline imports neither, and node_params (the parameters both read) imports none of them.
Rules are rows of RULES.
"""

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Modules ROS brings: client library, bags, transforms, launch, and every message package.
ROS_MODULES = ('rclpy', 'rosbag2_py', 'tf2_ros', 'tf2_py', 'launch', 'launch_ros',
               'message_filters', 'cv_bridge', 'ament_index_python', 'rosidl_runtime_py',
               '*_msgs', '*_srvs', '*_interfaces')

# The offline bag tools, which the live node's modules never import.
BAG_TOOLS = ('marigold_ros.bag_processor', 'marigold_ros.bag_job', 'marigold_ros.bag_io',
             'marigold_ros.ordered_threads', 'marigold_ros.process_bags')

# The live node's modules, which the offline tools never import.
NODE = ('marigold_ros.depth_node', 'marigold_ros.node_inputs', 'marigold_ros.node_threads')

# (package or module, sub-packages left out, forbidden module patterns, why).  A pattern
# forbids a module and everything below it (fnmatch: '*_msgs' is every message package).
RULES = (
    ('marigold_model', (), ROS_MODULES + ('marigold_ros',),
     'marigold_model must work without ROS'),
    ('marigold_model', ('marigold_model.training',), ('marigold_model.training',),
     'inference must not depend on the training code'),
    ('marigold_ros.depth_node', (), BAG_TOOLS,
     'the live node does not depend on the offline bag tools'),
    ('marigold_ros.node_inputs', (), BAG_TOOLS,
     'the node inputs do not depend on the offline bag tools'),
    ('marigold_ros.node_threads', (), BAG_TOOLS,
     'the node threads do not depend on the offline bag tools'),
    ('marigold_ros.bag_processor', (), NODE,
     'the bag processor does not depend on the live node'),
    ('marigold_ros.bag_job', (), NODE,
     'the bag job does not depend on the live node'),
    ('marigold_ros.bag_topics', (), NODE,
     'the bag topics do not depend on the live node'),
    ('marigold_ros.process_bags', (), NODE,
     'fleet processing does not depend on the live node'),
    ('marigold_ros.pipeline', (), NODE + ('marigold_ros.bag_processor',),
     'the pipeline serves the node and the bag processor and imports neither'),
    ('marigold_ros.node_params', (), NODE + ('marigold_ros.bag_processor', 'marigold_ros.bag_job',
                                             'marigold_ros.pipeline'),
     'the parameters import none of their users'),
)


def module_name(path):
    """Return the dotted module name of a file below ROOT."""
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def imported_modules(source, module, is_package=False):
    """
    Return every module a source imports, relative imports resolved, with line numbers.

    ``from X import name`` yields X and X.name (name may be a module).

    :param source: Python source text
    :param module: dotted name of the module the source belongs to
    :param is_package: the source is the package's __init__
    :return: list of (line, dotted name)
    """
    package = module.split('.') if is_package else module.split('.')[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f'{target}.{alias.name}') for alias in node.names]
    return found


def matches(name, pattern):
    """Tell whether a dotted module name is the pattern or lies below it."""
    parts = name.split('.')
    return any(fnmatch('.'.join(parts[:end]), pattern) for end in range(1, len(parts) + 1))


def violations(package, excluded, forbidden):
    """
    List the forbidden imports of a package's modules.

    :param package: dotted package (a folder under ROOT) or module (one file)
    :param excluded: dotted sub-packages whose modules the rule does not cover
    :param forbidden: module patterns (see :func:`matches`)
    :return: (files checked, list of 'file:line imports name')
    """
    single = ROOT / (package.replace('.', '/') + '.py')
    candidates = [single] if single.is_file() else \
        sorted((ROOT / package.replace('.', '/')).rglob('*.py'))
    files = [path for path in candidates
             if not any(matches(module_name(path), sub) for sub in excluded)]
    found = []
    for path in files:
        imports = imported_modules(path.read_text(), module_name(path),
                                   path.name == '__init__.py')
        found += [f'{path.relative_to(ROOT)}:{line} imports {name}'
                  for line, name in imports
                  if any(matches(name, pattern) for pattern in forbidden)]
    return files, found


@pytest.mark.parametrize('package, excluded, forbidden, why', RULES,
                         ids=[rule[3] for rule in RULES])
def test_import_rule_holds(package, excluded, forbidden, why):
    """Every module a rule covers keeps off the forbidden modules."""
    files, found = violations(package, excluded, forbidden)
    assert files, f'no module of {package} found under {ROOT}'
    assert not found, f'{why}:\n' + '\n'.join(found)


def test_inference_rule_covers_inference_and_not_training():
    """The inference rule reads the estimator and leaves the trainer out."""
    files, _ = violations('marigold_model', ('marigold_model.training',), ())
    names = {module_name(path) for path in files}
    assert 'marigold_model.estimator' in names
    assert 'marigold_model.data.nyu' in names
    assert not any(name.startswith('marigold_model.training') for name in names)


def test_relative_and_nested_imports_are_resolved():
    """A violation written as a relative import inside a function is still seen."""
    source = ('import os\n'
              'def load():\n'
              '    from ..training.trainer import Trainer\n'
              '    from . import yaml12\n'
              '    import sensor_msgs.msg\n')
    names = [name for _, name in imported_modules(source, 'marigold_model.data.reader')]
    assert 'marigold_model.training.trainer' in names
    assert 'marigold_model.data.yaml12' in names
    assert matches('marigold_model.training.trainer.Trainer', 'marigold_model.training')
    assert matches('sensor_msgs.msg', '*_msgs')
    assert not matches('marigold_model.trainingish', 'marigold_model.training')
    assert not matches('rosbags.highlevel', 'rosbag2_py')
    ros_names = [name for _, name in imported_modules(
        'from . import bag_io\nimport marigold_ros.geometry\n', 'marigold_ros.pipeline')]
    assert 'marigold_ros.bag_io' in ros_names and 'marigold_ros.geometry' in ros_names


def test_a_module_rule_reads_that_file_alone():
    """A rule on a module covers its file; a rule on a package covers every file below."""
    files, _ = violations('marigold_ros.pipeline', (), ())
    assert [module_name(path) for path in files] == ['marigold_ros.pipeline']
    files, _ = violations('marigold_ros', (), ())
    assert len(files) > 10
