"""ament_flake8 and ament_pep257 over all Python of the package, and ROS-free marigold_model."""

import ast
from pathlib import Path

from ament_flake8.main import main_with_errors as flake8_main
from ament_pep257.main import main as pep257_main

ROOT = Path(__file__).resolve().parents[1]
PYTHON_DIRS = ['marigold_model', 'marigold_ros', 'launch', 'test', 'bench', 'setup.py']
ROS_MODULES = {'rclpy', 'sensor_msgs', 'std_msgs', 'geometry_msgs', 'diagnostic_msgs',
               'visualization_msgs', 'builtin_interfaces', 'rcl_interfaces', 'lifecycle_msgs',
               'tf2_ros', 'cv_bridge', 'message_filters', 'launch', 'launch_ros', 'marigold_ros',
               'sensor_msgs_py', 'rosbag2_py'}


def _paths():
    return [str(ROOT / p) for p in PYTHON_DIRS if (ROOT / p).exists()]


def test_flake8():
    """Every Python file passes ament_flake8 (99 columns, single quotes, import order)."""
    rc, errors = flake8_main(argv=['--linelength', '99'] + _paths())
    assert rc == 0, f'{len(errors)} flake8 errors:\n' + '\n'.join(errors)


def test_pep257():
    """Every Python file passes ament_pep257."""
    rc = pep257_main(argv=_paths())
    assert rc == 0, 'pep257 errors, see the output above'


def test_marigold_model_imports_no_ros():
    """marigold_model stays usable without ROS: no module in it imports a ROS package."""
    offenders = []
    for path in sorted((ROOT / 'marigold_model').rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f'{path.relative_to(ROOT)}: {name}' for name in names
                          if name.split('.')[0] in ROS_MODULES]
    assert not offenders, 'ROS imports in marigold_model:\n' + '\n'.join(offenders)
