"""
YAML as ROS 2 (rcl) and YAML 1.2 read it: ``1e-4`` is a float.

PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``), so ``lr: 3e-5`` or
``ensemble_tol: 1e-4`` would be strings.  One loader for every YAML this project reads:
params files, training configs and recipes, and their command-line overrides.
"""

import re

import yaml


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats."""


Yaml12Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list('-+0123456789.'))


def load(stream):
    """Parse one YAML document (None when empty)."""
    return yaml.load(stream, Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
