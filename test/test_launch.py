"""
Tests of launch/depth.launch.py and rviz/depth.rviz.

The LaunchDescription is built only where launch_ros is importable (a ROS install); the
file's structure, its defaults and the RViz view are checked everywhere.
"""

import ast
import os
from pathlib import Path
import stat

from builders import load_script
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'depth.launch.py'
RVIZ_FILE = ROOT / 'rviz' / 'depth.rviz'
REQUIRED = {'camera', 'image', 'camera_info', 'sparse_depth', 'points_in', 'scale_source',
            'input_reliability', 'params_file', 'model', 'device', 'use_sim_time', 'lifecycle',
            'rviz'}
PLAIN_FUNCTIONS = ('_is_true', 'parameter_overrides', 'node_namespace', 'find_rviz2',
                   'check_rviz', '_private_file', '_rviz_config_for', 'remove_files')


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
    assert arguments['lifecycle'].value == 'false'
    assert arguments['input_reliability'].value == ''  # params_file's best_effort stands
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
    """Load the launch file's plain functions and OVERRIDES without launch / launch_ros."""
    tree = ast.parse(LAUNCH_FILE.read_text(), str(LAUNCH_FILE))
    wanted = [node for node in tree.body
              if isinstance(node, ast.FunctionDef) and node.name in PLAIN_FUNCTIONS
              or isinstance(node, ast.Assign)
              and getattr(node.targets[0], 'id', '') == 'OVERRIDES']
    imports = ast.parse('import os\nimport re\nimport shutil\nimport tempfile').body
    module = ast.Module(body=imports + wanted, type_ignores=[])
    namespace = {}
    exec(compile(module, str(LAUNCH_FILE), 'exec'), namespace)  # noqa: S102 - our own file
    assert set(PLAIN_FUNCTIONS) <= set(namespace)
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
    functions['remove_files']([str(rewritten)])
    assert not rewritten.exists()
    assert config_for(str(RVIZ_FILE), '') == str(RVIZ_FILE)


def test_empty_override_arguments_leave_the_params_file():
    """Only the override arguments given become parameters; use_sim_time becomes a bool."""
    overrides = _launch_functions()['parameter_overrides']
    assert overrides(dict.fromkeys(REQUIRED, '')) == {}
    given = overrides({'model': 'bundled:marigold-tiny', 'scale_source': 'points',
                       'input_reliability': 'reliable', 'use_sim_time': 'True', 'device': ''})
    assert given == {'model': 'bundled:marigold-tiny', 'scale_recovery.source': 'points',
                     'input_reliability': 'reliable', 'use_sim_time': True}
    assert overrides({'use_sim_time': 'false'}) == {'use_sim_time': False}
    assert overrides({'guidance': 'true'}) == {'scale_recovery.guidance': True}


def _fake_rviz2(folder):
    """Write an executable rviz2 that copies the config it is given (-d FILE) and exits."""
    executable = folder / 'rviz2'
    executable.write_text(f'#!/bin/sh\ncp "$2" "{folder}/seen.rviz"\n'
                          f'echo "$2" > "{folder}/path"\n')
    executable.chmod(executable.stat().st_mode | stat.S_IXUSR)
    return executable


def test_rviz_is_refused_when_rviz2_is_not_installed(tmp_path, monkeypatch):
    """rviz:=true needs rviz2 from the ament index or PATH; without it the launch refuses."""
    functions = _launch_functions()
    monkeypatch.delenv('AMENT_PREFIX_PATH', raising=False)
    monkeypatch.setenv('PATH', str(tmp_path))
    assert functions['find_rviz2']() is None
    assert functions['check_rviz']('false') is None  # not wanted: nothing to check
    with pytest.raises(RuntimeError, match='rviz2 is not installed'):
        functions['check_rviz']('true')
    executable = _fake_rviz2(tmp_path)
    assert functions['check_rviz']('true') == str(executable)
    # A sourced install: lib/rviz2/rviz2 under an ament prefix with rviz2 registered.
    prefix = tmp_path / 'install'
    (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages').mkdir(parents=True)
    (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'rviz2').touch()
    (prefix / 'lib' / 'rviz2').mkdir(parents=True)
    installed = _fake_rviz2(prefix / 'lib' / 'rviz2')
    monkeypatch.setenv('AMENT_PREFIX_PATH', str(prefix))
    pytest.importorskip('ament_index_python')
    assert functions['find_rviz2']() == str(installed)


def _load_launch_module():
    why = ('the ROS 2 launch packages are not importable (launch_ros has no PyPI wheel): '
           'runs in a sourced ROS 2 install (apt ros-<distro>-launch-ros)')
    pytest.importorskip('launch', reason=why)
    pytest.importorskip('launch_ros', reason=why)
    return load_script(LAUNCH_FILE, 'depth_launch')


def _run_launch(module, entities, **arguments):
    """Run entities with the file's arguments (the given ones set) until they end."""
    from launch import LaunchDescription, LaunchDescriptionSource, LaunchService
    from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription

    declared = [DeclareLaunchArgument(name, default_value=default)
                for name, default, _ in module.ARGUMENTS]
    service = LaunchService()
    service.include_launch_description(LaunchDescription([IncludeLaunchDescription(
        LaunchDescriptionSource(LaunchDescription(declared + entities)),
        launch_arguments=arguments.items())]))
    return service.run()


def test_launch_description_builds():
    """With launch_ros: arguments declared at top level, plain or lifecycle node by argument."""
    module = _load_launch_module()
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument
    from launch_ros.actions import LifecycleNode, Node

    description = module.generate_launch_description()
    declared = {e.name for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert REQUIRED <= declared
    nodes = [e for e in description.entities if isinstance(e, Node)]
    assert len(nodes) == 2  # the node is declared at top level (ros2 launch --print shows it)
    context = LaunchContext()
    values = {name: default for name, default, _ in module.ARGUMENTS}
    context.launch_configurations.update(values)
    chosen = [n for n in nodes if n.condition.evaluate(context)]
    assert len(chosen) == 1 and not isinstance(chosen[0], LifecycleNode)
    context.launch_configurations['lifecycle'] = 'true'
    chosen = [n for n in nodes if n.condition.evaluate(context)]
    assert len(chosen) == 1 and isinstance(chosen[0], LifecycleNode)


def test_overrides_file_holds_only_the_arguments_given(tmp_path):
    """With launch: the overrides substitution writes the given ones, else is params_file."""
    module = _load_launch_module()
    from launch import LaunchContext

    context = LaunchContext()
    values = {name: default for name, default, _ in module.ARGUMENTS}
    context.launch_configurations.update(values)
    temp_files = []
    overrides = module.ParameterOverrides(temp_files)
    assert overrides.perform(context) == values['params_file'] and temp_files == []
    context.launch_configurations.update(input_reliability='reliable', use_sim_time='true')
    written = Path(overrides.perform(context))
    assert temp_files == [str(written)]
    assert yaml.safe_load(written.read_text()) == {'/**': {'ros__parameters': {
        'input_reliability': 'reliable', 'use_sim_time': True}}}
    module.remove_files(temp_files)
    assert not written.exists()


def test_launch_refuses_rviz_without_rviz2_before_starting_anything(tmp_path, monkeypatch):
    """With launch: rviz:=true and no rviz2 fails the launch and no process is started."""
    module = _load_launch_module()
    from launch.actions import RegisterEventHandler
    from launch.event_handlers import OnProcessStart

    # An ament prefix holding a stand-in depth_node (exits at once) and no rviz2.
    prefix = tmp_path / 'install'
    (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages').mkdir(parents=True)
    (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'marigold_ros').touch()
    (prefix / 'lib' / 'marigold_ros').mkdir(parents=True)
    node = prefix / 'lib' / 'marigold_ros' / 'depth_node'
    node.write_text('#!/bin/sh\nexit 0\n')
    node.chmod(0o755)
    monkeypatch.setenv('AMENT_PREFIX_PATH', str(prefix))
    monkeypatch.setenv('PATH', str(tmp_path))

    def run(rviz):
        started = []
        watcher = RegisterEventHandler(OnProcessStart(
            on_start=lambda event, context: started.append(event.action.name)))
        entities = [watcher] + list(module.generate_launch_description().entities)
        return _run_launch(module, entities, rviz=rviz, camera='/cam'), started

    code, started = run('false')
    assert code == 0 and len(started) == 1  # the node starts when RViz is not asked for
    code, started = run('true')
    assert code != 0 and started == []


def test_rviz_config_is_removed_when_the_launch_ends(tmp_path, monkeypatch):
    """With launch: RViz gets the config rewritten for the namespace, removed at shutdown."""
    module = _load_launch_module()
    _fake_rviz2(tmp_path)
    monkeypatch.delenv('AMENT_PREFIX_PATH', raising=False)
    monkeypatch.setenv('PATH', f'{tmp_path}{os.pathsep}{os.environ["PATH"]}')
    temp_files = []
    entities = module.cleanup_and_rviz_check(temp_files) + module.rviz_entities(temp_files)
    assert _run_launch(module, entities, rviz='true', camera='/cam') == 0
    given = Path((tmp_path / 'path').read_text().strip())  # the fake rviz2 has run and ended
    assert 'Value: /cam/depth/points' in (tmp_path / 'seen.rviz').read_text()
    assert given.name.startswith('marigold_depth_cam_') and not given.exists()
    assert temp_files == []


def test_launched_node_publishes_depth_on_its_topics(tmp_path, monkeypatch):
    """With launch_ros: the launch file starts the real node, which answers an image on /cam."""
    import sys
    import threading
    import time

    module = _load_launch_module()
    rclpy = pytest.importorskip('rclpy')
    from marigold_ros.conversions import rgb_to_image
    import numpy as np
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import Header

    # An ament prefix whose depth_node runs this checkout's node with this interpreter.
    prefix = tmp_path / 'install'
    (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages').mkdir(parents=True)
    (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'marigold_ros').touch()
    (prefix / 'lib' / 'marigold_ros').mkdir(parents=True)
    node = prefix / 'lib' / 'marigold_ros' / 'depth_node'
    node.write_text(f'#!/bin/sh\nexec {sys.executable} -m marigold_ros.depth_node "$@"\n')
    node.chmod(0o755)
    monkeypatch.setenv('AMENT_PREFIX_PATH', str(prefix))
    domain = str(1 + os.getpid() % 100)
    monkeypatch.setenv('ROS_DOMAIN_ID', domain)
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')

    from launch import LaunchDescription, LaunchDescriptionSource, LaunchService
    from launch.actions import IncludeLaunchDescription
    service = LaunchService()
    service.include_launch_description(LaunchDescription([IncludeLaunchDescription(
        LaunchDescriptionSource(module.generate_launch_description()),
        launch_arguments={'camera': '/cam', 'model': 'bundled:marigold-tiny',
                          'device': 'cpu', 'input_reliability': 'reliable'}.items())]))
    received, errors = [], []

    def peer():
        # A graph of its own, as a user's tool would be: wait for the node's topics, then
        # send images until relative depth comes back; the launch ends either way.
        context = rclpy.Context()
        rclpy.init(context=context, domain_id=int(domain))
        io = rclpy.create_node('launch_check', context=context)
        try:
            io.create_subscription(Image, '/cam/depth/relative', received.append, 10)
            image = io.create_publisher(Image, '/cam/image', 10)
            info = io.create_publisher(CameraInfo, '/cam/camera_info', 10)
            executor = rclpy.executors.SingleThreadedExecutor(context=context)
            executor.add_node(io)
            deadline = time.monotonic() + 120.0
            while not received and time.monotonic() < deadline:
                header = Header(stamp=io.get_clock().now().to_msg(), frame_id='cam_optical')
                info.publish(CameraInfo(header=header, width=32, height=24,
                                        k=[30.0, 0, 16, 0, 30.0, 12, 0, 0, 1]))
                image.publish(rgb_to_image(np.full((24, 32, 3), 100, np.uint8), header))
                end = time.monotonic() + 0.5
                while time.monotonic() < end:
                    executor.spin_once(timeout_sec=0.05)
            topics = dict(io.get_topic_names_and_types())
            errors.extend(t for t in ('/cam/depth/relative', '/cam/depth/points',
                                      '/cam/depth/camera_info') if t not in topics)
            executor.shutdown()
        finally:
            io.destroy_node()
            rclpy.shutdown(context=context)
            service.shutdown()

    checker = threading.Thread(target=peer)
    checker.start()
    service.run()
    checker.join(60)
    assert received, 'the launched node published no relative depth'
    assert received[0].header.frame_id == 'cam_optical' and received[0].encoding == '32FC1'
    assert not errors, f'topics missing: {errors}'
