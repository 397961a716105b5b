"""The one YAML reader of featdenoise: YAML 1.2 floats and no key given twice.

:func:`yaml_load` reads config files and the values of ``key=value`` overrides alike
(:func:`parse_override`), so ``optim.weight_decay: 1e-4`` means the number everywhere and a
second ``optim:`` block is refused (:class:`DuplicateKeyError`, one line naming the file, the key
and both lines). It is a ``yaml.SafeLoader``: plain data only, never Python objects.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    """A YAML mapping names the same key twice (PyYAML would keep the last silently)."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading floats as YAML 1.2 does: ``1e-4``, ``1E3`` and ``1.0e12`` are
    numbers (YAML 1.1, PyYAML's default, needs a dot and a signed exponent and reads ``1e-4``
    as the *string* "1e-4"), and refusing a key given twice in one mapping, at any depth
    (:class:`DuplicateKeyError` naming the key and both lines; ``<<`` merges may override)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}  # key -> line of its first occurrence
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # an unhashable key: the constructor below says so
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(_duplicate(key_node.start_mark.name, key, seen[key],
                                                       line))
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _duplicate(stream: str, key, first: int, line: int) -> str:
    where = f"at lines {first} and {line}" if first != line else f"at line {line} (twice)"
    prefix = f"{stream}: " if stream and not stream.startswith("<") else ""
    return f"{prefix}duplicate key {key!r} {where}; keep one (YAML would silently use the last)"


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
                   |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(stream) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats and no duplicate keys (:class:`_Loader`); see the
    module docstring."""
    loader = _Loader(stream)  # a SafeLoader: plain data only, never Python objects
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml_file(path: str) -> Any:
    """The YAML document of the config file ``path``; a syntax error is one ``ValueError``
    naming the file, the line and the column."""
    with open(path) as f:
        try:
            return yaml_load(f)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config file {path} is not valid YAML{at}: {what}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=0.2"`` -> ``("optim.lr", 0.2)``: the dotted key and its value parsed as YAML
    (an empty value is the empty string). One-line ``ValueError`` for a missing ``=`` or a value
    that is not valid YAML."""
    if "=" not in item:
        raise ValueError(f"override '{item}' is not key=value (e.g. optim.lr=0.2)")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override '{item}': value is not valid YAML ({err})") from None
    except DuplicateKeyError as err:
        raise ValueError(f"override '{item}': {err}") from None
    return key.strip(), value


def merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` laid over it, nested mappings merged key by key (neither changed)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
