"""Reading the YAML files users write (configs, topologies, profiles, fault schedules).

One reader for all of them, stricter than `yaml.safe_load`, so every mistake is a ConfigError that
names the file, the key (or line) and the fix, never a traceback:
- the file is read as bytes and decoded as UTF-8; a bad byte is reported with its line;
- a key given twice in one mapping is an error (safe_load silently keeps the last one);
- aliases (`*name`) are limited: a few are handy, thousands are an alias bomb that expands to
  gigabytes when the value is used (printed in an error message, say).
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any, Iterator

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
    has_anchors = True  # set per document by load_yaml: without an anchor (&name) there can be no alias

    def construct_document(self, node: yaml.Node) -> Any:
        if self.has_anchors:
            _check_aliases(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> Any:
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            first = seen.setdefault((key_node.tag, key_node.value), key_node)
            if first is not key_node:
                raise _Problem(key_node.value, f"given twice (lines {first.start_mark.line + 1} and {key_node.start_mark.line + 1}); "
                               "YAML would silently keep the last", "keep one of them")
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    return []


def _check_aliases(root: yaml.Node) -> None:
    """Aliases without expanding them: a node reached twice is an alias use. Refuse more than
    MAX_ALIASES uses, a recursive alias, or aliases that would blow the document up more than
    tenfold (a "billion laughs" needs fewer than 100 aliases to reach 10^9 values)."""
    size: dict[int, int] = {}  # node -> how many values it expands to (memoised, so each node is visited once)
    on_path: set[int] = set()
    references = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        kids = _children(node)
        if children_done:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            continue
        if id(node) in on_path:
            raise _Problem("<file>", f"line {node.start_mark.line + 1}: an alias (*name) refers to itself",
                           "write the value out instead of the alias")
        if id(node) in size:
            continue
        references += len(kids)
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids)
    aliases = references + 1 - len(size)
    limit = max(100_000, 10 * len(size))
    if aliases > MAX_ALIASES or size[id(root)] > limit:
        raise _Problem("<file>", f"{aliases} alias uses (*name) that expand it to {size[id(root)]:,} values",
                       f"write the values out; more than {MAX_ALIASES} aliases, or a tenfold blow-up, is how a YAML bomb "
                       "eats memory")


@contextlib.contextmanager
def without_gc() -> Iterator[None]:
    """Building a big file's millions of small objects makes the cyclic collector run again and again over
    an ever larger heap (a 20,000-node topology: 10 s with it, 2 s without). Nothing built here is cyclic."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
    loader = _StrictLoader(text)
    loader.has_anchors = "&" in text
    try:
        with without_gc():
            return loader.get_single_data()
    except _Problem as p:
        raise ConfigError(path, p.key, p.problem, p.fix) from None
    except yaml.YAMLError as e:
        raise ConfigError(path, "<file>", f"not valid YAML: {e}", "fix the YAML syntax (indentation, colons, quotes)") from None
    except RecursionError:
        raise ConfigError(path, "<file>", "nested too deeply", "flatten the file; no config needs that much nesting") from None
    finally:
        loader.dispose()


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
