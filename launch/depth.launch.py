r"""
Start the marigold_depth node for one camera, and RViz on request.

Examples::

    ros2 launch marigold_ros depth.launch.py model:=bundled:marigold-tiny
    ros2 launch marigold_ros depth.launch.py camera:=/camera \
        image:=/camera/color/image_raw camera_info:=/camera/color/camera_info \
        rviz:=true fixed_frame:=camera_color_optical_frame

    ros2 launch marigold_ros depth.launch.py camera:=/camera image:=image_raw \
        points_in:=/velodyne_points scale_source:=points
    ros2 launch marigold_ros depth.launch.py lifecycle:=true   # managed: configure, activate

The node runs in the ``camera`` namespace (inside a namespace pushed by an including launch
file when ``camera`` is relative), so its outputs are ``<camera>/depth/relative``,
``<camera>/depth/points`` etc.; ``image``, ``camera_info``, ``sparse_depth`` and
``points_in`` remap its inputs (relative names resolve inside the camera namespace).  Every
other setting comes from ``params_file`` (default: the installed config/depth.yaml);
``model``, ``device``, ``scale_source``, ``guidance``, ``input_reliability`` and
``use_sim_time`` override it when given.  The remappings apply to the default single
camera (``cameras: ['']``); a params file serving several cameras names their topics by
namespace instead.

The node is declared at top level (``ros2 launch --print`` shows it with its remappings);
only RViz, whose config is rewritten for the namespace, is built in an OpaqueFunction.
``rviz:=true`` without rviz2 refuses before anything starts, and the rewritten RViz config
and the overrides file are removed when the launch ends.
"""

import os
import re
import shutil
import tempfile

from launch import LaunchDescription, Substitution
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.conditions import IfCondition, UnlessCondition
from launch.event_handlers import OnShutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
import yaml

# share/marigold_ros when installed (launch/ sits beside config/ and rviz/), the repository
# root when run from the source tree; no ament index needed either way.
_SHARE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PARAMS = os.path.join(_SHARE, 'config', 'depth.yaml')
DEFAULT_RVIZ = os.path.join(_SHARE, 'rviz', 'depth.rviz')

#: (name, default, description) of the launch arguments.
ARGUMENTS = (
    ('camera', '', 'namespace of the node and its topics, e.g. /camera (outputs go to '
                   '<camera>/depth/...)'),
    ('image', 'image', 'input image topic (sensor_msgs/Image; <image>/compressed for '
                       "image_transport 'compressed')"),
    ('camera_info', 'camera_info', 'camera_info topic matched to the images by stamp'),
    ('sparse_depth', 'sparse_depth', 'sparse metric depth Image (16UC1 mm / 32FC1 m) for the '
                                     'metric scale (scale_source sparse_depth)'),
    ('points_in', 'points_in', 'LiDAR PointCloud2 for the metric scale (scale_source '
                               'points; extrinsic from tf2)'),
    ('scale_source', '', 'override of scale_recovery.source: none, sparse_depth or points '
                         '(empty: params_file)'),
    ('guidance', '', 'override of scale_recovery.guidance: true steers the diffusion towards '
                     'the sparse points (Marigold-DC; much slower), false fits a scale '
                     'afterwards (empty: params_file)'),
    ('input_reliability', '', 'override of input_reliability: best_effort (receives from '
                              'every camera) or reliable (no loss of large images, only '
                              'from reliable publishers) (empty: params_file)'),
    ('params_file', DEFAULT_PARAMS, 'ROS 2 parameters file of the node'),
    ('model', '', "model override: HF id, local folder or 'bundled:marigold-tiny' "
                  '(empty: the value in params_file)'),
    ('device', '', 'device override: auto, cpu, cuda or cuda:N (empty: params_file)'),
    ('use_sim_time', '', 'use /clock (bag replay, simulation): true or false (empty: '
                         'params_file, else false)'),
    ('lifecycle', 'false', 'start the managed node (depth_lifecycle_node): it waits '
                           'unconfigured for ros2 lifecycle set <node> configure / activate'),
    ('rviz', 'false', 'also start rviz2 with the depth view (refused when rviz2 is not '
                      'installed)'),
    ('rviz_config', DEFAULT_RVIZ, 'RViz configuration file'),
    ('fixed_frame', '', 'RViz fixed frame: the optical frame_id of your images (empty: '
                        'the one saved in rviz_config)'),
)

#: launch argument -> node parameter it overrides when not empty.
OVERRIDES = (('model', 'model'), ('device', 'device'),
             ('scale_source', 'scale_recovery.source'), ('guidance', 'scale_recovery.guidance'),
             ('input_reliability', 'input_reliability'), ('use_sim_time', 'use_sim_time'))


def _is_true(text):
    return text.strip().lower() in ('true', '1', 'yes', 'on')


def parameter_overrides(arguments):
    """
    Return the node parameters the launch arguments override (empty ones leave params_file).

    :param arguments: launch argument name -> value (strings)
    :return: dict parameter name -> value (use_sim_time and guidance as bools)
    """
    overrides = {}
    for argument, parameter in OVERRIDES:
        value = arguments.get(argument, '')
        if value:
            boolean = parameter in ('use_sim_time', 'scale_recovery.guidance')
            overrides[parameter] = _is_true(value) if boolean else value
    return overrides


def node_namespace(camera, pushed=''):
    """
    Return the namespace the node ends up in, as launch_ros resolves it.

    :param camera: the ``camera`` argument
    :param pushed: the namespace pushed by an including launch file (``ros_namespace``)
    :return: absolute namespace ('' for the root)
    """
    if not camera.startswith('/'):
        camera = f'{pushed.rstrip("/")}/{camera}'
    return '/' + '/'.join(part for part in camera.split('/') if part) if camera.strip('/') \
        else ''


def find_rviz2():
    """
    Return the rviz2 executable, as launch_ros would run it, or None when not installed.

    The ament index is asked first (a sourced ROS install: lib/rviz2/rviz2), then PATH.

    :return: absolute path or None
    """
    try:
        from ament_index_python.packages import get_package_prefix
        path = os.path.join(get_package_prefix('rviz2'), 'lib', 'rviz2', 'rviz2')
        if os.access(path, os.X_OK):
            return path
    except (ImportError, LookupError, OSError):  # no ament index, or rviz2 not in it
        pass
    return shutil.which('rviz2')


def check_rviz(rviz):
    """
    Refuse ``rviz:=true`` on a machine without rviz2, before anything is started.

    :param rviz: the ``rviz`` argument
    :return: the rviz2 executable, or None when RViz is not wanted
    :raises RuntimeError: RViz wanted and rviz2 not found
    """
    if not _is_true(rviz):
        return None
    executable = find_rviz2()
    if executable is None:
        raise RuntimeError('rviz:=true but rviz2 is not installed (not in the ament index nor '
                           'on PATH): install ros-$ROS_DISTRO-rviz2 or launch without rviz; '
                           'nothing was started')
    return executable


def _private_file(prefix, suffix, text):
    """Write ``text`` to a new private temporary file (mkstemp) and return its path."""
    # mkstemp: a fixed name in the shared temp folder could belong to another user or be
    # rewritten by a second launch at the same time.
    handle, path = tempfile.mkstemp(prefix=prefix, suffix=suffix)
    with os.fdopen(handle, 'w') as stream:
        stream.write(text)
    return path


def _rviz_config_for(path, namespace):
    """Return an RViz config whose /depth/... topics are moved into the node's namespace."""
    if not namespace:
        return path
    with open(path) as stream:
        text = stream.read()
    text = text.replace('Value: /depth/', f'Value: {namespace}/depth/')
    name = re.sub(r'[^A-Za-z0-9_]+', '_', namespace).strip('_')
    return _private_file(f'marigold_depth_{name}_', '.rviz', text)


def remove_files(paths):
    """Remove the temporary files a launch wrote (at its shutdown); missing ones are fine."""
    while paths:
        try:
            os.unlink(paths.pop())
        except FileNotFoundError:
            pass


class ParameterOverrides(Substitution):
    """
    The params file of the override arguments given, written when the node starts.

    launch_ros cannot leave out a parameter whose argument is empty, hence a file.  Evaluates
    to a private temporary file (listed in ``temp_files`` for removal at shutdown), or to
    ``params_file`` itself when nothing is overridden.
    """

    def __init__(self, temp_files):
        """Keep the list the written file is added to."""
        super().__init__()
        self._temp_files = temp_files

    def describe(self):
        """Say what the substitution stands for (ros2 launch --print)."""
        return 'ParameterOverrides(' + ', '.join(a for a, _ in OVERRIDES) + ')'

    def perform(self, context):
        """Write the overrides given and return the file's path."""
        overrides = parameter_overrides(
            {argument: LaunchConfiguration(argument).perform(context)
             for argument, _ in OVERRIDES})
        if not overrides:
            return LaunchConfiguration('params_file').perform(context)
        path = _private_file('marigold_depth_overrides_', '.yaml', yaml.safe_dump(
            {'/**': {'ros__parameters': overrides}}, default_flow_style=False))
        self._temp_files.append(path)
        return path


def _refuse_missing_rviz(context):
    check_rviz(LaunchConfiguration('rviz').perform(context))
    return []


def _rviz_setup(context, temp_files):
    """Build RViz once the namespace is known (its config is rewritten for it)."""
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    namespace = node_namespace(arg('camera'), context.launch_configurations.get(
        'ros_namespace', ''))
    config = _rviz_config_for(arg('rviz_config'), namespace)
    if config != arg('rviz_config'):
        temp_files.append(config)
    rviz_args = ['-d', config]
    if arg('fixed_frame'):
        rviz_args += ['-f', arg('fixed_frame')]
    use_sim_time = parameter_overrides({'use_sim_time': arg('use_sim_time')})
    return [Node(executable=check_rviz('true'), name='marigold_rviz', arguments=rviz_args,
                 output='screen', parameters=[use_sim_time] if use_sim_time else [])]


def cleanup_and_rviz_check(temp_files):
    """
    Return the entities that go first: temp file removal at shutdown, then the rviz2 check.

    The handler is registered before anything writes a file, so a launch that fails later
    (or is refused) still removes what it wrote.

    :param temp_files: list the launch's temporary files are collected in
    :return: list of launch entities
    """
    return [RegisterEventHandler(OnShutdown(
                on_shutdown=lambda event, context: remove_files(temp_files))),
            OpaqueFunction(function=_refuse_missing_rviz)]


def rviz_entities(temp_files):
    """
    Return RViz (with rviz:=true), its config rewritten for the node's namespace.

    :param temp_files: list the rewritten config is added to
    :return: list of launch entities
    """
    return [OpaqueFunction(function=_rviz_setup, args=[temp_files],
                           condition=IfCondition(LaunchConfiguration('rviz')))]


def node_entities(temp_files):
    """
    Return the depth node, plain or lifecycle, declared with substitutions.

    :param temp_files: list the overrides file is added to
    :return: list of launch entities
    """
    # The node's own names, from the package (imported here: only a launch needs them).
    from marigold_ros.node_params import CAMERA_INFO_TOPIC, COMPRESSED_IMAGE_TOPIC
    from marigold_ros.node_params import IMAGE_TOPIC, NODE_NAME

    image = LaunchConfiguration('image')
    common = {
        'package': 'marigold_ros', 'name': NODE_NAME,
        'namespace': LaunchConfiguration('camera'), 'output': 'screen', 'emulate_tty': True,
        'parameters': [LaunchConfiguration('params_file'), ParameterOverrides(temp_files)],
        'remappings': [(IMAGE_TOPIC, image), (COMPRESSED_IMAGE_TOPIC, [image, '/compressed']),
                       (CAMERA_INFO_TOPIC, LaunchConfiguration('camera_info')),
                       ('sparse_depth', LaunchConfiguration('sparse_depth')),
                       ('points_in', LaunchConfiguration('points_in'))]}
    lifecycle = LaunchConfiguration('lifecycle')
    return [Node(executable='depth_node', condition=UnlessCondition(lifecycle), **common),
            LifecycleNode(executable='depth_lifecycle_node', condition=IfCondition(lifecycle),
                          **common)]


def generate_launch_description():
    """
    Declare the arguments, the clean-up, the rviz2 check, the node and RViz.

    The rviz2 check comes before the node: a launch that cannot start RViz starts nothing.

    :return: launch.LaunchDescription
    """
    temp_files = []  # rewritten RViz config, overrides file: removed at shutdown
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, default, text in ARGUMENTS]
    return LaunchDescription(declared + cleanup_and_rviz_check(temp_files) +
                             node_entities(temp_files) + rviz_entities(temp_files))
