r"""
Start the marigold_depth node for one camera, and RViz on request.

Examples::

    ros2 launch marigold_ros depth.launch.py model:=bundled:marigold-tiny
    ros2 launch marigold_ros depth.launch.py camera:=/camera \
        image:=/camera/color/image_raw camera_info:=/camera/color/camera_info \
        rviz:=true fixed_frame:=camera_color_optical_frame

The node runs in the ``camera`` namespace, so its outputs are ``<camera>/depth/relative``,
``<camera>/depth/points`` etc.; ``image`` and ``camera_info`` remap its inputs (relative
names resolve inside the camera namespace).  Every other setting comes from ``params_file``
(default: the installed config/depth.yaml); ``model`` and ``device`` override it when given.
"""

import os
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
    ('params_file', DEFAULT_PARAMS, 'ROS 2 parameters file of the node'),
    ('model', '', "model override: HF id, local folder or 'bundled:marigold-tiny' "
                  '(empty: the value in params_file)'),
    ('device', '', 'device override: auto, cpu, cuda or cuda:N (empty: params_file)'),
    ('use_sim_time', 'false', 'use /clock (bag replay, simulation)'),
    ('rviz', 'false', 'also start rviz2 with the depth view'),
    ('rviz_config', DEFAULT_RVIZ, 'RViz configuration file'),
    ('fixed_frame', '', 'RViz fixed frame: the optical frame_id of your images (empty: '
                        'the one saved in rviz_config)'),
)


def _is_true(text):
    return text.strip().lower() in ('true', '1', 'yes', 'on')


def _rviz_config_for(path, camera):
    """Return an RViz config whose /depth/... topics are moved into the camera namespace."""
    namespace = '/' + camera.strip('/') if camera.strip('/') else ''
    if not namespace:
        return path
    with open(path) as stream:
        text = stream.read()
    text = text.replace('Value: /depth/', f'Value: {namespace}/depth/')
    handle, rewritten = tempfile.mkstemp(prefix='marigold_depth_', suffix='.rviz')
    with os.fdopen(handle, 'w') as stream:
        stream.write(text)
    return rewritten


def _launch_setup(context):
    """Build the node (and RViz) once the launch arguments are known."""
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    camera = arg('camera')
    image = arg('image')
    sim_time = _is_true(arg('use_sim_time'))
    overrides = {'use_sim_time': sim_time}
    for name in ('model', 'device'):
        if arg(name):
            overrides[name] = arg(name)
    actions = [Node(
        package='marigold_ros', executable='depth_node', name='marigold_depth',
        namespace=camera, output='screen', emulate_tty=True,
        parameters=[arg('params_file'), overrides],
        remappings=[('image', image), ('image/compressed', image + '/compressed'),
                    ('camera_info', arg('camera_info'))])]
    if _is_true(arg('rviz')):
        rviz_args = ['-d', _rviz_config_for(arg('rviz_config'), camera)]
        if arg('fixed_frame'):
            rviz_args += ['-f', arg('fixed_frame')]
        actions.append(Node(package='rviz2', executable='rviz2', name='marigold_rviz',
                            arguments=rviz_args, output='screen',
                            parameters=[{'use_sim_time': sim_time}]))
    return actions


def generate_launch_description():
    """
    Declare the arguments and defer the node creation until they are resolved.

    :return: launch.LaunchDescription
    """
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, default, text in ARGUMENTS]
    return LaunchDescription(declared + [OpaqueFunction(function=_launch_setup)])
