"""
config/train/reference.yaml: every training setting with its meaning and default.

Rendered from TrainConfig and DataSpec (their comments and docstrings, by
marigold_model.config_docs) and from the data readers' signatures, so the reference changes
with the code; test/test_train_configs.py keeps the file in step.  Regenerate with

    python -m marigold_model.training.config_reference > config/train/reference.yaml
"""

from dataclasses import fields
import importlib
import inspect
import sys

from .train_config import DataSpec, READERS, TrainConfig
from ..config_docs import comment_lines, field_descriptions, yaml_value

HEADER = """\
Every setting of marigold-train, with its meaning and default (this file is generated from
TrainConfig: python -m marigold_model.training.config_reference > config/train/reference.yaml).
A config names only the settings it changes; any of them can also be set on the command
line: marigold-train CONFIG key=value ... (values are YAML, e.g. lr=1e-5 or
data='[{kind: folder, root: my_rgbd}]').  Examples: paper.yaml, finetune_folder.yaml,
finetune_bag.yaml in this folder."""


def _described(cls):
    """Return each field of a dataclass with its description; refuse undocumented fields."""
    docs = field_descriptions(cls)
    missing = [f.name for f in fields(cls) if not docs.get(f.name)]
    if missing:
        raise ValueError(f'{cls.__name__} fields without a description: {missing} (add a '
                         'comment above the field)')
    return [(f, docs[f.name]) for f in fields(cls)]


def reader_options(kind):
    """Return a data kind's reader options, (name, default or inspect.Parameter.empty)."""
    module, name, fixed = READERS[kind]
    reader = getattr(importlib.import_module(module, __package__), name)
    parameters = list(inspect.signature(reader.__init__).parameters.values())[1:]
    options = [(p.name, p.default) for p in parameters if p.name not in fixed]
    if kind == 'synthetic':
        options.append(('scene', {}))
    return options


def _data_section():
    """Render the data list (the default source) with the keys and each kind's options."""
    out = []
    for spec_field, text in _described(DataSpec):
        out += comment_lines(f'{spec_field.name}: {text}', '  ')
    out.append("  # Options by kind (the reader's keyword arguments, with their defaults):")
    for kind, (_, reader, _) in READERS.items():
        options = ', '.join(f'{name} (required)' if default is inspect.Parameter.empty
                            else f'{name}: {yaml_value(default)}'
                            for name, default in reader_options(kind))
        lines = comment_lines(f'{kind} ({reader}): {options}', '  ', 95)
        out += [lines[0].replace('#', '#  ', 1)] + [
            line.replace('#', '#    ', 1) for line in lines[1:]]
    for index, spec in enumerate(TrainConfig().data):
        for number, spec_field in enumerate(fields(DataSpec)):
            lead = '  - ' if number == 0 else '    '
            out.append(f'{lead}{spec_field.name}: {yaml_value(getattr(spec, spec_field.name))}')
    return out


def reference_yaml():
    """Render config/train/reference.yaml; loading it gives TrainConfig()."""
    defaults = TrainConfig()
    out = [f'# {line}'.rstrip() for line in HEADER.splitlines()]
    for config_field, text in _described(TrainConfig):
        out.append('')
        out += comment_lines(text)
        if config_field.name == 'data':
            out.append('data:')
            out += _data_section()
        else:
            out.append(f'{config_field.name}: {yaml_value(getattr(defaults, config_field.name))}')
    return '\n'.join(out) + '\n'


def main():
    """Print the reference (redirect it into config/train/reference.yaml)."""
    sys.stdout.write(reference_yaml())


if __name__ == '__main__':
    main()
