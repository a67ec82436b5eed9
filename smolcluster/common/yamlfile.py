"""Reading the YAML files users write (configs, topologies, profiles, fault schedules).

One reader for all of them, stricter than `yaml.safe_load`, so every mistake is a ConfigError that
names the file, the key (or line) and the fix, never a traceback:
- the file is read as bytes and decoded as UTF-8; a bad byte is reported with its line;
- a key given twice in one mapping is an error (safe_load silently keeps the last one);
- aliases (`*name`) are limited: a few are handy, thousands are an alias bomb that expands to
  gigabytes when the value is used (printed in an error message, say).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from smolcluster.common.errors import ConfigError

# More alias uses than any hand-written config needs; a "billion laughs" file needs far more.
MAX_ALIASES = 100

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: 10x faster on big topologies


class _Problem(Exception):
    """Raised inside the loader; read_yaml turns it into a ConfigError with the file name."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key, self.problem, self.fix = key, problem, fix


class _StrictLoader(_Loader):  # type: ignore[misc, valid-type]
    def construct_document(self, node: yaml.Node) -> Any:
        _check_aliases(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _Problem(str(key), f"given twice (lines {seen[key]} and {line}); YAML would silently keep the last",
                               "keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_aliases(root: yaml.Node) -> None:
    """Count nodes reached more than once (that is what an alias is) without expanding them."""
    seen: set[int] = set()
    aliases = 0
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _Problem("<file>", f"line {node.start_mark.line + 1}: more than {MAX_ALIASES} alias uses (*name)",
                               "write the values out; this many aliases is how a YAML bomb blows up memory")
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack += [k, v]


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(path, "<file>", f"line {line}: byte 0x{data[e.start]:02x} is not UTF-8",
                          "save the file as UTF-8 (plain ASCII is fine)") from None


def load_yaml(path: Path, *, what: str = "file", missing_fix: str | None = None) -> Any:
    """Any YAML document (None when empty); every problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "<file>", f"{what} not found",
                          missing_fix or f"create it or pass --config-dir pointing at a folder with {path.name}") from None
    except OSError as e:
        raise ConfigError(path, "<file>", f"cannot read the {what}: {e.strerror or e}", "check the path and its permissions") from None
    text = _decode(path, data)
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader (SafeLoader/CSafeLoader subclass)
    except _Problem as p:
        raise ConfigError(path, p.key, p.problem, p.fix) from None
    except yaml.YAMLError as e:
        raise ConfigError(path, "<file>", f"not valid YAML: {e}", "fix the YAML syntax (indentation, colons, quotes)") from None
    except RecursionError:
        raise ConfigError(path, "<file>", "nested too deeply", "flatten the file; no config needs that much nesting") from None


def read_yaml(path: Path, *, what: str = "file", missing_fix: str | None = None,
              layout: str = "write 'key: value' lines") -> dict:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping).
    `what`, `missing_fix` and `layout` tailor the messages to the kind of file (config, topology, profiles)."""
    data = load_yaml(path, what=what, missing_fix=missing_fix)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "<file>", "top level must be a mapping", layout)
    return data
