"""
Documentation of config dataclasses, read from their source: one mechanism, no ROS.

A field is documented by the ``:param name:`` entry of its class docstring, else by the
comment lines above it or the comment on its line.  config/depth.yaml (the node's
parameters, marigold_ros.params) and config/train/reference.yaml (the training settings,
marigold_model.training.config_reference) are both rendered from it, so a default or its
description changes in the dataclass and nowhere else.
"""

import ast
import functools
import inspect
import io
import math
import re
import textwrap
import tokenize

_NOQA = re.compile(r'\s*noqa(:\s*[A-Z]+\d+)?\s*(-\s*)?', re.IGNORECASE)
_ROLE = re.compile(r':\w+:`~?([^`]+)`')


def clean_text(text):
    """Strip '#', noqa markers and reST markup (``x``, :func:`~a.b.c`) from documentation."""
    text = _ROLE.sub(lambda m: m.group(1).split('.')[-1], text.lstrip('#'))
    return ' '.join(_NOQA.sub(' ', text).replace('``', '').split())


@functools.lru_cache(maxsize=None)
def field_descriptions(cls):
    """
    Return the documentation of each field of a dataclass.

    Taken from the ``:param name:`` entries of the class docstring, else from the source:
    the comment lines directly above the field and the comment on its own line.  Without
    source (e.g. a zipped install) only the docstring is used.

    :param cls: a dataclass type
    :return: dict field name -> one-line description (missing fields are absent)
    """
    out = {}
    doc = inspect.getdoc(cls) or ''
    for match in re.finditer(r':param (\w+):(.*?)(?=\n\s*:|\Z)', doc, re.S):
        out[match.group(1)] = clean_text(match.group(2))
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return out
    lines = source.splitlines()
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string
    classdef = ast.parse(source).body[0]
    for node in classdef.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name = node.target.id
        if name in out:
            continue
        above = []
        line = node.lineno - 1
        while line in comments and lines[line - 1].strip().startswith('#'):
            above.insert(0, clean_text(comments[line]))
            line -= 1
        parts = [text for text in above if text]
        trailing = comments.get(node.end_lineno)
        if trailing and not lines[node.end_lineno - 1].strip().startswith('#'):
            parts.append(clean_text(trailing))
        text = ' '.join(p for p in parts if p)
        if text:
            out[name] = text
    return out


def yaml_value(value):
    """
    Write a default as YAML that reads back as the same value (YAML 1.2 floats, quoted text).

    :param value: bool, int, float, str, None, or a tuple / list / dict of them
    :return: YAML text on one line
    """
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float):
        return '.inf' if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, (tuple, list)):
        return '[' + ', '.join(yaml_value(v) for v in value) + ']'
    if isinstance(value, dict):
        return '{' + ', '.join(f'{k}: {yaml_value(v)}' for k, v in value.items()) + '}'
    return str(value)


def comment_lines(text, indent='', width=99):
    """Wrap a one-line description into YAML comment lines of at most ``width`` columns."""
    return [f'{indent}# {line}' for line in textwrap.wrap(
        text, width - len(indent) - 2, break_on_hyphens=False)]
