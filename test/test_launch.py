"""
Tests of launch/depth.launch.py and rviz/depth.rviz.

The LaunchDescription is built only where launch_ros is importable (a ROS install); the
file's structure, its defaults and the RViz view are checked everywhere.
"""

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'depth.launch.py'
RVIZ_FILE = ROOT / 'rviz' / 'depth.rviz'
REQUIRED = {'camera', 'image', 'camera_info', 'sparse_depth', 'points_in', 'scale_source',
            'params_file', 'model', 'device', 'use_sim_time', 'rviz'}


def _arguments_from_source():
    """Read the ARGUMENTS table of the launch file without importing launch."""
    tree = ast.parse(LAUNCH_FILE.read_text(), str(LAUNCH_FILE))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                getattr(t, 'id', None) == 'ARGUMENTS' for t in node.targets):
            return {element.elts[0].value: element.elts[1] for element in node.value.elts}
    raise AssertionError('no ARGUMENTS table in the launch file')


def test_launch_file_declares_the_arguments_with_defaults():
    """Every documented argument exists; rviz is off and use_sim_time left to params_file."""
    arguments = _arguments_from_source()
    assert REQUIRED <= set(arguments)
    # use_sim_time is empty by default: a params file's own setting is not overridden.
    assert arguments['rviz'].value == 'false' and arguments['use_sim_time'].value == ''
    assert arguments['model'].value == '' and arguments['camera'].value == ''
    # The defaults point at files that exist next to the launch folder (installed: share/).
    assert (LAUNCH_FILE.parent.parent / 'config' / 'depth.yaml').is_file()
    assert (LAUNCH_FILE.parent.parent / 'rviz' / 'depth.rviz').is_file()


def test_rviz_view_shows_depth_and_rgb_cloud_in_the_camera_frame():
    """The RViz config has the depth image, an RGB8 cloud and the optical frame fixed."""
    config = yaml.safe_load(RVIZ_FILE.read_text())
    manager = config['Visualization Manager']
    displays = {d['Class']: d for d in manager['Displays'] if d.get('Enabled', True)}
    image = displays['rviz_default_plugins/Image']
    assert image['Topic']['Value'] == '/depth/relative'
    assert (image['Min Value'], image['Max Value'], image['Normalize Range']) == (0, 1, False)
    cloud = displays['rviz_default_plugins/PointCloud2']
    assert cloud['Topic']['Value'] == '/depth/points'
    assert cloud['Color Transformer'] == 'RGB8'
    assert cloud['Topic']['Reliability Policy'] == 'Reliable'
    assert manager['Global Options']['Fixed Frame'].endswith('optical_frame')


def _launch_functions():
    """Load the launch file's plain functions without launch / launch_ros."""
    tree = ast.parse(LAUNCH_FILE.read_text(), str(LAUNCH_FILE))
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef)
              and node.name in ('node_namespace', '_rviz_config_for')]
    imports = ast.parse('import os\nimport re\nimport tempfile').body
    module = ast.Module(body=imports + wanted, type_ignores=[])
    namespace = {}
    exec(compile(module, str(LAUNCH_FILE), 'exec'), namespace)  # noqa: S102 - our own file
    return namespace


def test_rviz_follows_the_node_namespace():
    """The RViz topics follow the node: camera argument, inside a pushed namespace or not."""
    functions = _launch_functions()
    node_namespace, config_for = functions['node_namespace'], functions['_rviz_config_for']
    assert node_namespace('', '') == ''
    assert node_namespace('/camera', '/robot') == '/camera'  # absolute: as given
    assert node_namespace('camera', '/robot') == '/robot/camera'
    assert node_namespace('', '/robot/') == '/robot'
    rewritten = Path(config_for(str(RVIZ_FILE), '/robot/camera'))
    assert 'Value: /robot/camera/depth/points' in rewritten.read_text()
    assert rewritten.stat().st_mode & 0o077 == 0  # a private file
    rewritten.unlink()
    assert config_for(str(RVIZ_FILE), '') == str(RVIZ_FILE)


def _load_launch_module():
    why = ('the ROS 2 launch packages are not importable (launch_ros has no PyPI wheel): '
           'runs in a sourced ROS 2 install (apt ros-<distro>-launch-ros)')
    pytest.importorskip('launch', reason=why)
    pytest.importorskip('launch_ros', reason=why)
    spec = importlib.util.spec_from_file_location('depth_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_description_builds():
    """With launch_ros: the description declares the arguments and builds node and RViz."""
    module = _load_launch_module()
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument
    from launch_ros.actions import Node

    description = module.generate_launch_description()
    declared = {e.name for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert REQUIRED <= declared
    context = LaunchContext()
    values = {name: default for name, default, _ in module.ARGUMENTS}
    context.launch_configurations.update(values)
    actions = module._launch_setup(context)
    assert len(actions) == 1 and isinstance(actions[0], Node)
    values.update(rviz='true', camera='/cam', fixed_frame='cam_optical')
    context.launch_configurations.update(values)
    actions = module._launch_setup(context)
    assert len(actions) == 2 and all(isinstance(a, Node) for a in actions)
    rewritten = Path(module._rviz_config_for(str(RVIZ_FILE), '/cam')).read_text()
    assert 'Value: /cam/depth/points' in rewritten
