"""package.xml declares every third-party module the installed code imports."""

import ast
from pathlib import Path
import sys
import xml.etree.ElementTree as ElementTree

ROOT = Path(__file__).resolve().parents[1]

# Import name -> rosdep key (rosdistro's rosdep/*.yaml) or ROS package name.
ROSDEP_KEYS = {
    'numpy': 'python3-numpy', 'scipy': 'python3-scipy', 'PIL': 'python3-pil',
    'yaml': 'python3-yaml', 'h5py': 'python3-h5py', 'tqdm': 'python3-tqdm',
    'torch': 'python3-pytorch-pip', 'transformers': 'python3-transformers-pip',
    'huggingface_hub': 'python3-huggingface-hub-pip', 'rosbags': 'python3-rosbags-pip',
    'rclpy': 'rclpy', 'sensor_msgs': 'sensor_msgs', 'std_msgs': 'std_msgs',
    'geometry_msgs': 'geometry_msgs', 'diagnostic_msgs': 'diagnostic_msgs',
    'lifecycle_msgs': 'lifecycle_msgs', 'rcl_interfaces': 'rcl_interfaces',
    'builtin_interfaces': 'builtin_interfaces', 'tf2_ros': 'tf2_ros_py',
    'launch': 'launch', 'launch_ros': 'launch_ros', 'ament_index_python': 'ament_index_python',
}
# No rosdep key exists: these must be in requirements.txt instead.
# (onnxruntime has python3-onnxruntime-pip, but the GPU and Jetson builds are other wheels)
PIP_ONLY = {'diffusers', 'accelerate', 'safetensors', 'onnx', 'onnxruntime', 'ray'}
# Imported only when present, each with a fallback (EXR readers).
OPTIONAL = {'cv2', 'imageio'}


def _imported_modules():
    """Top-level third-party module names imported by the installed code and launch files."""
    names = set()
    files = [*ROOT.glob('marigold_model/**/*.py'), *ROOT.glob('marigold_ros/**/*.py'),
             *ROOT.glob('launch/*.py')]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split('.')[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split('.')[0])
    return {name for name in names
            if name not in sys.stdlib_module_names
            and name not in ('marigold_model', 'marigold_ros')}


def _declared_keys():
    """Return the exec_depend keys of package.xml."""
    tree = ElementTree.parse(ROOT / 'package.xml')
    return {element.text.strip() for element in tree.getroot().iter('exec_depend')}


def _requirement_names():
    """Distribution names in requirements.txt, lower case."""
    names = set()
    for line in (ROOT / 'requirements.txt').read_text().splitlines():
        line = line.split('#')[0].strip()
        if line:
            names.add(line.split('[')[0].split('=')[0].split('<')[0].split('>')[0].lower())
    return names


def test_every_import_has_a_rosdep_key_or_a_pip_requirement():
    """A new dependency must reach package.xml (or requirements.txt where rosdep has no key)."""
    declared = _declared_keys()
    requirements = _requirement_names()
    unknown = sorted(_imported_modules() - set(ROSDEP_KEYS) - PIP_ONLY - OPTIONAL)
    assert not unknown, f'imports with no rosdep key or pip requirement listed here: {unknown}'
    for module in sorted(_imported_modules() & set(ROSDEP_KEYS)):
        key = ROSDEP_KEYS[module]
        assert key in declared, f'{module}: add {key} to package.xml'
    for module in sorted(_imported_modules() & PIP_ONLY):
        assert module in requirements, f'{module}: add it to requirements.txt'
