"""
The import rules of marigold_ros (issue 13), read from the source with ast.

The live node and the offline bag processor sit side by side on the shared stages: neither
imports the other, and the pipeline imports neither.  The node's parameters live in
node_params, which imports neither the node, the bag tools nor the pipeline.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'marigold_ros'

#: module -> modules of marigold_ros it must never import (directly or by a local import).
FORBIDDEN = {
    'depth_node': {'bag_processor', 'bag_io', 'ordered_threads'},
    'bag_processor': {'depth_node'},
    'bag_topics': {'depth_node'},
    'pipeline': {'depth_node', 'bag_processor'},
    'node_params': {'depth_node', 'bag_processor', 'pipeline'},
}


def imported_modules(path):
    """
    Return the marigold_ros modules a source file imports, anywhere in the file.

    :param path: a module of marigold_ros
    :return: set of module names (without the package)
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ''
                if base:
                    found.add(base.split('.')[0])
                else:  # from . import name
                    found.update(alias.name for alias in node.names)
            elif node.level == 0 and (node.module or '').startswith('marigold_ros.'):
                found.add(node.module.split('.')[1])
            elif node.level == 0 and node.module == 'marigold_ros':
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('marigold_ros.'):
                    found.add(alias.name.split('.')[1])
    return found


def test_imported_modules_sees_every_form(tmp_path):
    """The reader finds relative, absolute, 'from . import' and function-local imports."""
    source = tmp_path / 'example.py'
    source.write_text('from .pipeline import x\nfrom . import bag_io\n'
                      'import marigold_ros.geometry\n'
                      'def f():\n    from marigold_ros.depth_node import y\n')
    assert imported_modules(source) == {'pipeline', 'bag_io', 'geometry', 'depth_node'}


@pytest.mark.parametrize('module', sorted(FORBIDDEN))
def test_module_keeps_its_import_rules(module):
    """Each module imports none of the modules it must stay independent of."""
    path = PACKAGE / f'{module}.py'
    assert path.is_file(), path
    broken = sorted(imported_modules(path) & FORBIDDEN[module])
    assert not broken, f'marigold_ros.{module} imports {broken}'
