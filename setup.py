"""Build and install marigold_ros and marigold_model (ament_python and plain pip)."""

from glob import glob
import os

from setuptools import find_packages, setup

PACKAGE = 'marigold_ros'


def _tree(source, destination):
    """
    List data files under ``source`` as (install dir, files) pairs for setuptools.

    :param source: folder in the repository
    :param destination: install folder below share/<package>
    :return: list of (install dir, [files]) tuples
    """
    pairs = []
    for root, _, files in os.walk(source):
        if files:
            target = os.path.join('share', PACKAGE, destination, os.path.relpath(root, source))
            pairs.append((os.path.normpath(target), [os.path.join(root, f) for f in files]))
    return pairs


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*', 'bench']),
    package_data={'marigold_model': ['models/*/*', 'models/*/*/*', 'recipes/*.yaml'],
                  'marigold_ros': ['samples/*', 'samples/*/*']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', glob('launch/*.launch.py')),
        ('share/' + PACKAGE + '/config', glob('config/*.yaml') + glob('config/*.xml')
         + glob('config/*.json')),
        ('share/' + PACKAGE + '/config/train', glob('config/train/*.yaml')),
        ('share/' + PACKAGE + '/rviz', glob('rviz/*.rviz')),
    ] + _tree('marigold_ros/samples', 'samples'),
    install_requires=['setuptools'],
    zip_safe=False,
    maintainer='marigold_ros developers',
    maintainer_email='dev@marigold-ros.invalid',
    description='Monocular depth for ROS 2 with Marigold.',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            'depth_node = marigold_ros.depth_node:main',
            'depth_lifecycle_node = marigold_ros.depth_node:lifecycle_main',
            'process_bag = marigold_ros.bag_processor:main',
            'process_bags = marigold_ros.process_bags:main',
            'marigold_demo = marigold_ros.demo:main',
            'marigold-train = marigold_model.training.trainer:main',
            'marigold-eval = marigold_model.training.evaluate:main',
            'marigold-estimate = marigold_model.cli:main',
            'marigold-export-onnx = marigold_model.onnx_export:main',
        ],
    },
)
