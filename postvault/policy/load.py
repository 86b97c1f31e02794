"""Loading and checking ``conf/policy.toml``.

Like the server config (``postvault.conf.load``), loading is strict and
driven by the schema (``postvault.policy.schema``): an unknown key is an
error with a "did you mean" suggestion, a wrong type or value names what was
expected and what the file says. Unlike it, the policy checker reports every
problem at once, each as ``FILE:LINE: key: expected ..., got ...``, because
an admin edits this file by hand and fixes it in one go.

Lines: ``tomllib`` gives no positions for keys, so :class:`_Lines` finds them
by scanning the text for table headers (``[a."b c"]``) and ``key =`` lines,
keeping the first line of each dotted path. It does not follow keys written
as inline tables (``roles = { member = { ... } }``) or dotted keys inside
them; a problem there is reported at the nearest enclosing line it found
(the table header, else line 1). Simple, and right for files written in the
shape of ``default.toml``.

:class:`PolicyHolder` keeps the policy in force and swaps in a new one only
if the whole file is valid, which is what a SIGHUP reload needs.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

# Shared with the server-config loader so that both files describe a wrong
# value in the same words ("the string "15 MB"", "the boolean true").
from postvault.conf.load import describe_value, quote, toml_error_position
from postvault.conf.schema import Expected
from postvault.errors import ConfigError
from postvault.policy.schema import ExpectedItem, Policy

POLICY_FILE = Path("conf") / "policy.toml"

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_BARE_PART = re.compile(r"[A-Za-z0-9_-]+")


class PolicyInvalid(ConfigError):
    """``conf/policy.toml`` is invalid; ``problems`` holds every problem, one
    line each. The message is the first, with a count of the rest."""

    def __init__(self, problems: list[str]) -> None:
        more = len(problems) - 1
        tail = f" (and {more} more; run `postvault policy check` to see all)" if more else ""
        super().__init__(problems[0] + tail)
        self.problems = problems


# --- public API ----------------------------------------------------------------


def load_policy(path: Path) -> Policy:
    """The policy in ``path``; raises :class:`PolicyInvalid` (a ``ConfigError``)."""
    text, problems = _read(path)
    if text is None:
        raise PolicyInvalid(problems)
    return load_policy_text(text, str(path))


def load_policy_text(text: str, source: str) -> Policy:
    """Parse and validate policy ``text``; ``source`` names it in messages."""
    policy, problems = _parse(text, source)
    if problems or policy is None:
        raise PolicyInvalid(problems)
    return policy


def check_policy_file(path: Path) -> list[str]:
    """Every problem of the policy file at ``path``, in file order; [] if valid."""
    text, problems = _read(path)
    if text is None:
        return problems
    return _parse(text, str(path))[1]


def check_policy_text(text: str, source: str) -> list[str]:
    """Every problem of policy ``text``, in file order; [] if valid."""
    return _parse(text, source)[1]


class PolicyHolder:
    """The policy in force, replaced only by a valid one.

    Readers take ``holder.policy`` once per decision (or per message), so a
    reload in the middle never mixes two policies in one decision; the swap
    is a single attribute assignment.
    """

    def __init__(self, policy: Policy | None = None) -> None:
        self._policy = policy if policy is not None else Policy()

    @classmethod
    def from_file(cls, path: Path) -> PolicyHolder:
        """At startup an invalid file is fatal (:class:`PolicyInvalid`)."""
        return cls(load_policy(path))

    @property
    def policy(self) -> Policy:
        return self._policy

    def reload(self, path: Path) -> list[str]:
        """Load ``path``; on success use it and return []. Otherwise keep the
        policy in force and return the problems (for the log)."""
        text, problems = _read(path)
        if text is None:
            return problems
        policy, problems = _parse(text, str(path))
        if problems or policy is None:
            return problems
        self._policy = policy
        return []


# --- reading and parsing ---------------------------------------------------------


def _read(path: Path) -> tuple[str | None, list[str]]:
    try:
        return Path(path).read_text(encoding="utf-8"), []
    except FileNotFoundError:
        return None, [f"{path}: no such file"]
    except IsADirectoryError:
        return None, [f"{path}: is a folder, expected the policy file"]
    except UnicodeDecodeError as exc:
        return None, [f"{path}: expected UTF-8 text, got a byte that isn't at offset {exc.start}"]
    except OSError as exc:
        return None, [f"{path}: cannot read: {exc.strerror}"]


def _parse(text: str, source: str) -> tuple[Policy | None, list[str]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [_syntax_problem(exc, text, source)]
    except RecursionError:
        # tomllib reads nested arrays and inline tables recursively; a few
        # hundred "[" exhaust the stack (fuzz/policy.py found it).
        return None, [f"{source}:1: expected valid TOML, got arrays or tables nested too deeply"]
    problems = _Problems(source, _Lines(text))
    policy = _Builder(problems).policy(data)
    return policy, problems.sorted()


def _syntax_problem(exc: tomllib.TOMLDecodeError, text: str, source: str) -> str:
    line, column, reason = toml_error_position(exc, text)
    if line is None:
        return f"{source}:1: expected valid TOML, got: {reason}"
    if column is None:
        return f"{source}:{line}: expected valid TOML, got an error at the end: {reason}"
    return f"{source}:{line}: expected valid TOML, got an error at column {column}: {reason}"


# --- the schema as a tree of tables ----------------------------------------------


@dataclass(frozen=True)
class _Section:
    """A table whose keys are the fields of ``cls``."""

    cls: type


@dataclass(frozen=True)
class _TableOf:
    """A table of tables keyed by free names (``[offices."x@y"]``)."""

    cls: type
    key: Any  # parser of the names


def _tree() -> dict[str, Any]:
    """The tables of the file: a dict is a group, a table that only holds
    other tables ([roles]); the leaves are _Section and _TableOf."""
    root: dict[str, Any] = {}
    for f in fields(Policy):
        *parents, last = f.metadata["path"]
        group = root
        for name in parents:
            group = group.setdefault(name, {})
        if "section" in f.metadata:
            group[last] = _Section(f.metadata["section"])
        else:
            group[last] = _TableOf(f.metadata["table_of"], f.metadata["key"])
    return root


def _toml_names(cls: type) -> Iterator[tuple[str, Any, str | None]]:
    """(TOML key, field, spread item) for each key of the table ``cls``."""
    for f in fields(cls):
        spread = f.metadata.get("spread")
        if spread:
            for item in spread:
                yield item, f, item
        else:
            yield f.metadata.get("toml") or f.name, f, None


def _all_keys() -> list[tuple[str, ...]]:
    """Every key path of the schema, for "right key, wrong table" hints."""
    out: list[tuple[str, ...]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for name, child in node.items():
                walk(child, (*path, name))
        elif isinstance(node, _Section):
            out.extend((*path, name) for name, _, _ in _toml_names(node.cls))
        else:
            out.extend((*path, "<address>", name) for name, _, _ in _toml_names(node.cls))

    walk(_tree(), ())
    return out


def dotted(path: tuple[str, ...]) -> str:
    """A key path as TOML writes it: quoted where a part isn't a bare key."""
    return ".".join(part if _BARE_KEY.match(part) else quote(part) for part in path)


class _Builder:
    """Walks the parsed TOML along the schema, collecting problems and
    building the typed policy from what is valid."""

    def __init__(self, problems: _Problems) -> None:
        self.problems = problems
        self.all_keys = _all_keys()

    def policy(self, data: dict[str, Any]) -> Policy:
        tree = _tree()
        self._check_groups(tree, data, ())
        values: dict[str, Any] = {}
        for f in fields(Policy):
            raw = _dig(data, f.metadata["path"])
            if raw is None:
                continue  # absent (or not a table: reported above); the default stands
            if "section" in f.metadata:
                values[f.name] = self._section(f.metadata["section"], raw, f.metadata["path"])
            else:
                values[f.name] = self._table_of(f.metadata["table_of"], f.metadata["key"], raw,
                                                f.metadata["path"])
        return Policy(**values)

    def _check_groups(self, group: dict[str, Any], data: dict[str, Any], path: tuple[str, ...]) -> None:
        """Unknown names at group level, and tables given as plain values."""
        for name, value in data.items():
            here = (*path, name)
            node = group.get(name)
            if node is None:
                self._unknown(here, value, list(group), tables=True)
            elif not isinstance(value, dict):
                self.problems.add(here, f"expected a table [{dotted(here)}], got {describe_value(value)}")
            elif isinstance(node, dict):
                self._check_groups(node, value, here)

    def _section(self, cls: type, raw: dict[str, Any], path: tuple[str, ...]) -> Any:
        known = {name: (f, item) for name, f, item in _toml_names(cls)}
        values: dict[str, Any] = {}
        spread: dict[str, dict[str, Any]] = {}
        valid = True
        for name, item in raw.items():
            here = (*path, name)
            if name not in known:
                # Not a reason to skip the invariants: no default stands in.
                self._unknown(here, item, list(known), tables=False)
                continue
            f, spread_item = known[name]
            try:
                value = f.metadata["parse"](item)
            except Expected as exc:
                detail = f" ({exc.detail})" if exc.detail else ""
                got = exc.got if isinstance(exc, ExpectedItem) else describe_value(item)
                self.problems.add(here, f"expected {exc.expected}, got {got}{detail}")
                valid = False
                continue
            if spread_item is None:
                values[f.name] = value
            else:
                spread.setdefault(f.name, {})[spread_item] = value
        for f in fields(cls):
            if f.name in spread:
                # Keys the file leaves out keep their default, in schema order.
                default = cast(Callable[[], Mapping[str, Any]], f.default_factory)()
                merged = {**default, **spread[f.name]}
                values[f.name] = MappingProxyType({k: merged[k] for k in f.metadata["spread"]})
        table = cls(**values)
        # Rules across keys judge only tables whose keys are each valid:
        # otherwise a default standing in for a bad value would be blamed.
        if valid:
            for invalid in getattr(table, "invariants", list)():
                if invalid.key not in raw and invalid.instead is not None:
                    invalid = invalid.instead
                self.problems.add((*path, invalid.key), invalid.message)
        return table

    def _table_of(self, cls: type, parse_key: Any, raw: dict[str, Any],
                  path: tuple[str, ...]) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        first: dict[str, str] = {}
        for name, item in raw.items():
            here = (*path, name)
            try:
                normal = parse_key(name)
            except Expected as exc:
                self.problems.add(here, f"expected {exc.expected}, got {quote(name)}")
                continue
            if normal in first:
                self.problems.add(here, f"expected each address once, got {quote(name)} after"
                                        f" {quote(first[normal])} (addresses ignore case)")
                continue
            first[normal] = name
            if not isinstance(item, dict):
                self.problems.add(here, f"expected a table [{dotted(here)}], got {describe_value(item)}")
                continue
            out[normal] = self._section(cls, item, here)
        return MappingProxyType(out)

    def _unknown(self, path: tuple[str, ...], value: Any, candidates: list[str], *, tables: bool) -> None:
        """An unknown name; ``tables``: the candidates are tables, shown as [name]."""
        name = path[-1]
        kind = "table" if isinstance(value, dict) else "key"
        shown = {c: f"[{dotted((*path[:-1], c))}]" if tables else dotted((*path[:-1], c)) for c in candidates}
        close = difflib.get_close_matches(name, list(shown), n=1)
        if not close:
            # Case only: "drafts" for "Drafts" scores too low when short.
            close = [c for c in shown if c.lower() == name.lower()][:1]
        if close:
            hint = f', did you mean "{shown[close[0]]}"?'
        else:
            # The right key in the wrong table, e.g. `max_size` under [auth].
            elsewhere = [k for k in self.all_keys if k[-1] == name and k[:-1] != path[:-1]]
            if elsewhere:
                hint = f', did you mean "{dotted(elsewhere[0])}"?'
            else:
                hint = f"; expected one of: {', '.join(shown.values())}"
        self.problems.add(path, f"unknown {kind}{hint}")


def _dig(data: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = data
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    return node if isinstance(node, dict) else None


# --- problems and their lines ------------------------------------------------------


class _Problems:
    def __init__(self, source: str, lines: _Lines) -> None:
        self.source = source
        self.lines = lines
        self.items: list[tuple[int, int, str]] = []

    def add(self, path: tuple[str, ...], message: str) -> None:
        line = self.lines.find(path)
        self.items.append((line, len(self.items), f"{self.source}:{line}: {dotted(path)}: {message}"))

    def sorted(self) -> list[str]:
        return [text for _, _, text in sorted(self.items)]


class _Lines:
    """The first line of each table header and key in a TOML text."""

    def __init__(self, text: str) -> None:
        self.first: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("["):
                # [table] or [[array-of-tables]]; the closing bracket ends it.
                inner = stripped.lstrip("[")
                parts, rest = _split_key(inner)
                if parts and rest.lstrip().startswith("]"):
                    table = parts
                    self.first.setdefault(table, number)
                continue
            parts, rest = _split_key(stripped)
            if parts and rest.lstrip().startswith("="):
                for depth in range(1, len(parts) + 1):
                    self.first.setdefault((*table, *parts[:depth]), number)

    def find(self, path: tuple[str, ...]) -> int:
        """The line of ``path``, else of its nearest ancestor found, else 1."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.first:
                return self.first[path[:end]]
        return 1


def _split_key(text: str) -> tuple[tuple[str, ...], str]:
    """The dotted TOML key at the start of ``text`` and what follows it;
    ((), text) if there is none."""
    parts: list[str] = []
    i = 0
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] in "\"'":
            quote = text[i]
            j = i + 1
            while j < len(text) and text[j] != quote:
                j += 2 if quote == '"' and text[j] == "\\" else 1
            if j >= len(text):
                return (), text
            try:
                # tomllib unquotes the part exactly, escapes included.
                parts.append(tomllib.loads(f"k = {text[i:j + 1]}")["k"])
            except tomllib.TOMLDecodeError:
                return (), text
            i = j + 1
        else:
            match = _BARE_PART.match(text, i)
            if not match:
                return (), text
            parts.append(match[0])
            i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        return tuple(parts), text[i:]
