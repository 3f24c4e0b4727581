"""
Config dataclasses <-> ROS parameters, with descriptors, by one generic mechanism.

The frozen config dataclasses stay the one source of defaults.  A :class:`ConfigGroup`
declares one parameter per field: its type follows the default, its description is the
field's documentation (``:param name:`` in the class docstring, else the field's comments),
ranges and choices go into the descriptor, and ``read_only`` is set where a change needs a
reload, so that ``ros2 param set`` refuses it instead of silently ignoring it.
"""

from dataclasses import dataclass, field, fields, replace
import math
import re
import textwrap

from marigold_model import yaml12
from marigold_model.config_docs import field_descriptions
from marigold_model.config_docs import yaml_value as _yaml_value
from rcl_interfaces.msg import FloatingPointRange
from rcl_interfaces.msg import IntegerRange
from rcl_interfaces.msg import ParameterDescriptor
from rcl_interfaces.msg import ParameterType
import yaml

# Limits of rcl_interfaces ranges: int64 and a float range must be finite.
_INT_MIN, _INT_MAX = -2 ** 63, 2 ** 63 - 1
_FLOAT_LIMIT = 1.0e300


def _param_type(value):
    """Return the ParameterType of a default value, or raise TypeError."""
    if isinstance(value, bool):
        return ParameterType.PARAMETER_BOOL
    if isinstance(value, int):
        return ParameterType.PARAMETER_INTEGER
    if isinstance(value, float):
        return ParameterType.PARAMETER_DOUBLE
    if isinstance(value, str):
        return ParameterType.PARAMETER_STRING
    if isinstance(value, (tuple, list)) and value:
        if all(isinstance(v, bool) for v in value):
            return ParameterType.PARAMETER_BOOL_ARRAY
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return ParameterType.PARAMETER_INTEGER_ARRAY
        if all(isinstance(v, float) for v in value):
            return ParameterType.PARAMETER_DOUBLE_ARRAY
        if all(isinstance(v, str) for v in value):
            return ParameterType.PARAMETER_STRING_ARRAY
    raise TypeError(f'no ROS parameter type for default {value!r} ({type(value).__name__}); '
                    'use bool, int, float, str or a non-empty tuple of one of them')


@dataclass(frozen=True)
class ConfigGroup:
    """
    The ROS parameters of one frozen config dataclass.

    :param cls: the dataclass type (frozen, every field with a default)
    :param prefix: prepended to each field name to form the parameter name (e.g.
        'scale_recovery.'); '' for flat names
    :param read_only: every parameter of the group is read-only (a change needs a reload)
    :param read_only_fields: field names that are read-only in an otherwise writable group
    :param exclude: field names not exposed (the default value is used)
    :param ranges: field name -> (low, high), inclusive, for numeric fields
    :param choices: field name -> allowed values (listed in the descriptor; checked by the
        dataclass)
    :param descriptions: field name -> description, for fields whose documentation in the
        dataclass is missing or shared with other fields (takes precedence)
    :param doc_sources: further dataclasses whose field documentation is used for fields
        that ``cls`` does not document (e.g. a config that mirrors another one's fields)
    """

    cls: type
    prefix: str = ''
    read_only: bool = False
    read_only_fields: tuple = ()
    exclude: tuple = ()
    ranges: dict = field(default_factory=dict, hash=False)
    choices: dict = field(default_factory=dict, hash=False)
    descriptions: dict = field(default_factory=dict, hash=False)
    doc_sources: tuple = ()

    def __post_init__(self):
        """Check that ranges, choices and exclusions name real fields."""
        names = {f.name for f in fields(self.cls)}
        for what, keys in (('ranges', self.ranges), ('choices', self.choices),
                           ('exclude', self.exclude), ('descriptions', self.descriptions),
                           ('read_only_fields', self.read_only_fields)):
            unknown = set(keys) - names
            if unknown:
                raise ValueError(f'{what} of the {self.cls.__name__} parameters name unknown '
                                 f'fields {sorted(unknown)}')

    # ------------------------------------------------------------------ description

    def fields(self):
        """Return the exposed dataclasses.Field objects."""
        return [f for f in fields(self.cls) if f.name not in self.exclude]

    def parameter_name(self, field_name):
        """Return the parameter name of a field (prefix + field name)."""
        return self.prefix + field_name

    def names(self):
        """Return {parameter name: field name}."""
        return {self.parameter_name(f.name): f.name for f in self.fields()}

    def defaults(self):
        """Return the default config (every field at its default)."""
        return self.cls()

    def description(self, field_name):
        """Return a field's text: ``descriptions``, the dataclass, ``doc_sources``, or its name."""
        if field_name in self.descriptions:
            return self.descriptions[field_name]
        for source in (self.cls,) + tuple(self.doc_sources):
            text = field_descriptions(source).get(field_name)
            if text:
                return text
        return field_name.replace('_', ' ')

    def constraints(self, field_name, with_read_only=True):
        """Describe a field's allowed values, e.g. 'one of: a, b; range [0, 1]' ('' for none)."""
        parts = []
        if field_name in self.choices:
            parts.append('one of: ' + ', '.join(str(c) for c in self.choices[field_name]))
        if field_name in self.ranges:
            low, high = self.ranges[field_name]
            parts.append(f'range [{low}, {high}]')
        if with_read_only and self.is_read_only(field_name):
            parts.append('read-only at runtime: restart the node to change')
        return '; '.join(parts)

    def is_read_only(self, field_name):
        """Tell whether a field's parameter is read-only (a change needs a reload)."""
        return self.read_only or field_name in self.read_only_fields

    def descriptor(self, field_name, default):
        """Build the ParameterDescriptor of one field; its default value gives the type."""
        kind = _param_type(default)
        descriptor = ParameterDescriptor(
            name=self.parameter_name(field_name), type=kind,
            description=f'{self.description(field_name)} (default: {_format_value(default)})',
            read_only=self.is_read_only(field_name),
            additional_constraints=self.constraints(field_name))
        if kind in (ParameterType.PARAMETER_DOUBLE, ParameterType.PARAMETER_DOUBLE_ARRAY):
            # 'scale: 2' in YAML or '-p scale:=2' (and '[0, 0, 1]' for an array) gives
            # integers; static typing would refuse them at startup, so doubles accept
            # integers (converted in build()).
            descriptor.dynamic_typing = True
        if field_name in self.ranges:
            low, high = self.ranges[field_name]
            if kind == ParameterType.PARAMETER_INTEGER:
                descriptor.integer_range = [IntegerRange(
                    from_value=int(max(low, _INT_MIN)), to_value=int(min(high, _INT_MAX)),
                    step=1)]
            elif kind == ParameterType.PARAMETER_DOUBLE:
                descriptor.floating_point_range = [FloatingPointRange(
                    from_value=float(max(low, -_FLOAT_LIMIT)),
                    to_value=float(min(high, _FLOAT_LIMIT)), step=0.0)]
            else:
                raise ValueError(f'range given for non-numeric field {field_name!r}')
        return descriptor

    # ------------------------------------------------------------------ ROS

    def declare(self, node, defaults=None):
        """
        Declare the group's parameters on a node and return the resulting config.

        Values from the command line or a params file override ``defaults`` (default:
        ``cls()``).

        :raises ValueError: a value is out of range or not allowed, naming it
        """
        defaults = defaults if defaults is not None else self.defaults()
        for f in self.fields():
            value = _to_ros(getattr(defaults, f.name))
            node.declare_parameter(self.parameter_name(f.name), value,
                                   self.descriptor(f.name, value))
        return self.from_node(node)

    def from_node(self, node):
        """Build the config from the node's current values (ValueError: a bad combination)."""
        values = {f.name: node.get_parameter(self.parameter_name(f.name)).value
                  for f in self.fields()}
        return self.build(values)

    def build(self, values, base=None):
        """
        Make a validated config from {field name: ROS value}, other fields from ``base``.

        :raises ValueError: a value is not allowed (the dataclass says which)
        """
        base = base if base is not None else self.defaults()
        known = {f.name: f for f in fields(self.cls)}
        converted = {}
        for name, value in values.items():
            if name not in known:
                raise ValueError(f'{self.cls.__name__} has no field {name!r}')
            converted[name] = _from_ros(value, getattr(base, name), self.parameter_name(name))
        for name, value in converted.items():
            self._check(name, value)
        try:
            config = replace(base, **converted)
        except TypeError as error:
            raise ValueError(f'{self.cls.__name__}: {error}') from None
        return config

    def _check(self, name, value):
        """Range and choice checks (rclpy enforces ranges too, but not in build())."""
        if name in self.ranges and isinstance(value, (int, float)) and \
                not isinstance(value, bool):
            low, high = self.ranges[name]
            if not (low <= value <= high):
                raise ValueError(f'{self.parameter_name(name)} must be within [{low}, '
                                 f'{high}], got {value}')
        if name in self.choices and value not in self.choices[name]:
            raise ValueError(f'{self.parameter_name(name)} must be one of '
                             f'{tuple(self.choices[name])}, got {value!r}')

    def apply(self, config, parameters):
        """
        Apply rclpy Parameters to a config, for an on-set-parameters callback.

        Other groups' parameters are ignored.

        :return: (new config, True) when a parameter of this group changed, else
            (config, False)
        :raises ValueError: a new value is not allowed (naming the parameter)
        """
        names = self.names()
        changes = {names[p.name]: p.value for p in parameters if p.name in names}
        if not changes:
            return config, False
        return self.build(changes, base=config), True


def _to_ros(value):
    """Turn a default value into what declare_parameter takes (tuples -> lists)."""
    return list(value) if isinstance(value, tuple) else value


def _type_name(value):
    """Name a value's type the way a ROS user writes it (params file, ros2 param set)."""
    if isinstance(value, bool):
        return 'boolean'
    if isinstance(value, int):
        return 'integer'
    if isinstance(value, float):
        return 'number'
    if isinstance(value, str):
        return 'string'
    if isinstance(value, (tuple, list)):
        return 'list'
    return type(value).__name__


def _type_error(name, expected, value):
    return ValueError(f'{name} must be {expected}, got {_type_name(value)} {value!r}')


def _from_ros(value, default, name):
    """
    Turn a parameter value into the field's type (arrays -> tuples, int -> float).

    :raises ValueError: the value has the wrong type, naming the expected one
    """
    if isinstance(default, tuple):
        if not isinstance(value, (tuple, list)):
            raise _type_error(name, 'a list', value)
        if default and all(isinstance(v, float) for v in default):
            return tuple(_from_ros(v, 0.0, name) for v in value)
        if default:
            try:
                for item in value:
                    _from_ros(item, default[0], name)
            except ValueError:
                raise _type_error(name, f'a list of {_type_name(default[0])}s', value) \
                    from None
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _type_error(name, 'a boolean (true or false)', value)
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(name, 'an integer', value)
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(name, 'a number', value)
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise _type_error(name, 'a string', value)
    return value


def _format_value(value):
    if isinstance(value, float) and math.isinf(value):
        return '.inf'
    if isinstance(value, (tuple, list)):
        return '[' + ', '.join(_format_value(v) for v in value) + ']'
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


def declare_groups(node, groups):
    """Declare several groups and return their configs, refusing duplicate parameter names."""
    groups = list(groups)
    check_unique(groups)
    return [group.declare(node) for group in groups]


def check_unique(groups):
    """Raise ValueError if two groups would declare the same parameter name."""
    seen = {}
    for group in groups:
        for name in group.names():
            if name in seen:
                raise ValueError(f'parameter {name!r} is exposed by both '
                                 f'{seen[name].__name__} and {group.cls.__name__}; give one '
                                 'of the groups a prefix or exclude the field')
            seen[name] = group.cls


def yaml_document(groups, node_name, header=''):
    """
    Render the parameters of the groups as a commented ROS 2 params file.

    Dotted names ('scale_recovery.source') become nested mappings; each parameter is
    preceded by its description and constraints as comments.

    :param node_name: node name key ('/**' matches any node)
    :param header: comment text put at the top (lines without '#')
    """
    out = [f'# {line}'.rstrip() for line in header.splitlines()]
    out += [f'{node_name}:', '  ros__parameters:']
    for group in groups:
        out.append('')
        out.append(f'    # ---- {group.cls.__name__}' +
                   (' (read-only at runtime)' if group.read_only else ''))
        opened = None
        for f in group.fields():
            default = getattr(group.defaults(), f.name)
            name = group.parameter_name(f.name)
            indent = '    '
            if '.' in name:
                section, leaf = name.rsplit('.', 1)
                if section != opened:
                    out.append(f'{indent}{section}:')
                    opened = section
                indent += '  '
                name = leaf
            text = group.description(f.name)
            constraints = group.constraints(f.name, with_read_only=not group.read_only)
            if constraints:
                text += f' [{constraints}]'
            out += [f'{indent}# {line}' for line in textwrap.wrap(
                text, 99 - len(indent) - 2, break_on_hyphens=False)]
            out.append(f'{indent}{name}: {_yaml_value(default)}')
    return '\n'.join(out) + '\n'


def _node_sections(mapping, namespace=''):
    """Yield (fully qualified key, ros__parameters) of a params document, nesting included."""
    for key, value in mapping.items():
        if not isinstance(value, dict):
            continue
        name = f'{namespace}/{str(key).strip("/")}'
        if isinstance(value.get('ros__parameters'), dict):
            yield name, value['ros__parameters']
        else:  # a namespace level: 'camera: {marigold_depth: {ros__parameters: ...}}'
            yield from _node_sections(value, name)


def read_params_file(path, node_name):
    """
    Read the parameters of a node from a ROS 2 params file as flat dotted names.

    Sections apply as rcl applies them to a node of that name ('/**', '/**/name', 'name',
    '/ns/name', nested namespace levels; '*' wildcards): those for any namespace first, then
    those for one namespace, each with wildcard names before the node's own name.  Nested
    parameter mappings become dotted names ('scale_recovery: {source: x}' ->
    'scale_recovery.source').  Floats read as rcl reads them (YAML 1.2: '1e-4' is a
    number).

    :return: dict parameter name -> value
    :raises ValueError: unreadable file, no ros__parameters section for the node, or
        sections for the node in several namespaces (which one is meant is ambiguous)
    """
    try:
        with open(path, encoding='utf-8') as stream:
            document = yaml12.load(stream) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f'cannot read params file {path!r}: {exc}') from exc
    if not isinstance(document, dict):
        raise ValueError(f'params file {path!r} is not a mapping of node names')
    # The node's namespace is not known here (process_bag has none): a section for a
    # concrete namespace may be the one meant, but sections for two concrete namespaces
    # are ambiguous.  Order: any-namespace sections, then wildcard names, then the name.
    ranked = []
    for key, parameters in _node_sections(document):
        namespace, last = key.rsplit('/', 1)
        if last == node_name:
            rank = 2
        elif '*' in last and re.fullmatch(last.replace('**', '*').replace('*', '.*'),
                                          node_name):
            rank = 1
        else:
            continue
        specific = '*' not in namespace and namespace != ''
        ranked.append((rank + (3 if specific else 0), namespace if specific else '', parameters))
    namespaces = sorted({namespace for _, namespace, _ in ranked if namespace})
    if len(namespaces) > 1:
        raise ValueError(f'params file {path!r} has sections for {node_name!r} in several '
                         f'namespaces ({", ".join(namespaces)}): pass one camera\'s file')
    if not ranked:
        raise ValueError(f'params file {path!r} has no "{node_name}: ros__parameters:" or '
                         f'"/**: ros__parameters:" section (it has {sorted(document)})')
    flat = {}
    for _, _, parameters in sorted(ranked, key=lambda item: item[0]):  # stable: file order
        _flatten(parameters, '', flat)
    return flat


def _flatten(mapping, prefix, out):
    for key, value in mapping.items():
        if isinstance(value, dict):
            _flatten(value, f'{prefix}{key}.', out)
        else:
            out[f'{prefix}{key}'] = value


def configs_from_values(groups, values, node_name):
    """
    Map {parameter name: value} onto {config class: instance}, for every group.

    :param node_name: node name, for the error message
    :raises ValueError: unknown parameter names (rclpy's own, use_sim_time and
        qos_overrides.*, are accepted and ignored), or a bad value (naming it)
    """
    check_unique(groups)
    # Parameters rclpy declares on every node (a params file shared with the live node
    # may set them); they do not shape the configs.
    unknown = {name for name in values
               if name != 'use_sim_time' and not name.startswith('qos_overrides.')}
    configs = {}
    for group in groups:
        names = group.names()
        mine = {names[name]: value for name, value in values.items() if name in names}
        unknown -= set(names)
        configs[group.cls] = group.build(mine)
    if unknown:
        raise ValueError(f'unknown parameters {sorted(unknown)} (the node '
                         f'{node_name!r} has no such parameter)')
    return configs
