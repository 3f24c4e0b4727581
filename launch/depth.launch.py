r"""
Start the marigold_depth node for one camera, and RViz on request.

Examples::

    ros2 launch marigold_ros depth.launch.py model:=bundled:marigold-tiny
    ros2 launch marigold_ros depth.launch.py camera:=/camera \
        image:=/camera/color/image_raw camera_info:=/camera/color/camera_info \
        rviz:=true fixed_frame:=camera_color_optical_frame

    ros2 launch marigold_ros depth.launch.py camera:=/camera image:=image_raw \
        points_in:=/velodyne_points scale_source:=points

The node runs in the ``camera`` namespace (inside a namespace pushed by an including launch
file when ``camera`` is relative), so its outputs are ``<camera>/depth/relative``,
``<camera>/depth/points`` etc.; ``image``, ``camera_info``, ``sparse_depth`` and
``points_in`` remap its inputs (relative names resolve inside the camera namespace).  Every
other setting comes from ``params_file`` (default: the installed config/depth.yaml);
``model``, ``device`` and ``scale_source`` override it when given.  The remappings apply to
the default single camera (``cameras: ['']``); a params file serving several cameras names
their topics by namespace instead.
"""

import os
import re
import tempfile

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

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
    ('params_file', DEFAULT_PARAMS, 'ROS 2 parameters file of the node'),
    ('model', '', "model override: HF id, local folder or 'bundled:marigold-tiny' "
                  '(empty: the value in params_file)'),
    ('device', '', 'device override: auto, cpu, cuda or cuda:N (empty: params_file)'),
    ('use_sim_time', '', 'use /clock (bag replay, simulation): true or false (empty: '
                         'params_file, else false)'),
    ('rviz', 'false', 'also start rviz2 with the depth view'),
    ('rviz_config', DEFAULT_RVIZ, 'RViz configuration file'),
    ('fixed_frame', '', 'RViz fixed frame: the optical frame_id of your images (empty: '
                        'the one saved in rviz_config)'),
)


def _is_true(text):
    return text.strip().lower() in ('true', '1', 'yes', 'on')


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


def _rviz_config_for(path, namespace):
    """Return an RViz config whose /depth/... topics are moved into the node's namespace."""
    if not namespace:
        return path
    with open(path) as stream:
        text = stream.read()
    text = text.replace('Value: /depth/', f'Value: {namespace}/depth/')
    # A new private file (mkstemp): a fixed name in the shared temp folder could belong to
    # another user or be rewritten by a second launch at the same time.
    name = re.sub(r'[^A-Za-z0-9_]+', '_', namespace).strip('_')
    handle, rewritten = tempfile.mkstemp(prefix=f'marigold_depth_{name}_', suffix='.rviz')
    with os.fdopen(handle, 'w') as stream:
        stream.write(text)
    return rewritten


def _launch_setup(context):
    """Build the node (and RViz) once the launch arguments are known."""
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    # The node's own names, from the package (imported here: only a launch run needs them).
    from marigold_ros.node_params import CAMERA_INFO_TOPIC, COMPRESSED_IMAGE_TOPIC
    from marigold_ros.node_params import IMAGE_TOPIC, NODE_NAME

    camera = arg('camera')
    image = arg('image')
    overrides = {}
    if arg('use_sim_time'):  # else params_file's own use_sim_time stands
        overrides['use_sim_time'] = _is_true(arg('use_sim_time'))
    for name in ('model', 'device'):
        if arg(name):
            overrides[name] = arg(name)
    if arg('scale_source'):
        overrides['scale_recovery.source'] = arg('scale_source')
    actions = [Node(
        package='marigold_ros', executable='depth_node', name=NODE_NAME,
        namespace=camera, output='screen', emulate_tty=True,
        parameters=[arg('params_file'), overrides],
        remappings=[(IMAGE_TOPIC, image), (COMPRESSED_IMAGE_TOPIC, image + '/compressed'),
                    (CAMERA_INFO_TOPIC, arg('camera_info')),
                    ('sparse_depth', arg('sparse_depth')), ('points_in', arg('points_in'))])]
    if _is_true(arg('rviz')):
        namespace = node_namespace(camera, context.launch_configurations.get('ros_namespace',
                                                                             ''))
        rviz_args = ['-d', _rviz_config_for(arg('rviz_config'), namespace)]
        if arg('fixed_frame'):
            rviz_args += ['-f', arg('fixed_frame')]
        actions.append(Node(package='rviz2', executable='rviz2', name='marigold_rviz',
                            arguments=rviz_args, output='screen',
                            parameters=[{'use_sim_time': overrides['use_sim_time']}]
                            if 'use_sim_time' in overrides else []))
    return actions


def generate_launch_description():
    """
    Declare the arguments and defer the node creation until they are resolved.

    :return: launch.LaunchDescription
    """
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, default, text in ARGUMENTS]
    return LaunchDescription(declared + [OpaqueFunction(function=_launch_setup)])
