"""Loading, rendering and showing ``conf/postvault.toml``.

Loading is strict on purpose: an admin's typo (an unknown key, a quoted
number, a port out of range) must stop the server with one line naming the
file, the dotted key and what was expected, rather than silently fall back to
a default. Every key can be overridden by an environment variable
``POSTVAULT_<SECTION>_<KEY>``; an error in an override names the variable.

Everything here is driven by :mod:`postvault.conf.schema`.
"""

from __future__ import annotations

import datetime
import difflib
import os
import re
import textwrap
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from postvault.conf.schema import (
    REQUIRED,
    Config,
    Expected,
    KeySpec,
    is_dns_name,
    keys,
    mask_secret,
    sections,
)
from postvault.errors import ConfigError, HomeError

CONFIG_FILE = Path("conf") / "postvault.toml"
ENV_PREFIX = "POSTVAULT_"
# Variables with the POSTVAULT_ prefix that are not config keys, so the
# "unknown variable" check lets them through. POSTVAULT_HOME: the CLI's
# default for --home.
ENV_NOT_CONFIG = frozenset({"POSTVAULT_HOME"})

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean (true or false)"}

_HEADER = """\
Postvault server configuration.

Paths are relative to the home folder (the folder that holds conf/).
Every key can be overridden by an environment variable
POSTVAULT_<SECTION>_<KEY>, e.g. POSTVAULT_LISTEN_IMAPS=127.0.0.1:10993
(top-level keys as POSTVAULT_HOSTNAME); an empty string disables a listener."""

_SHOW_HEADER = """\
Effective Postvault configuration (environment overrides applied).
Passwords are shown as ***."""


# --- loading ---------------------------------------------------------------


def load_config(home: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Load ``home/conf/postvault.toml`` with overrides from ``environ``
    (default: the process environment).

    Raises ``HomeError`` when the file is missing (the home folder is
    incomplete) and ``ConfigError`` when it is invalid.
    """
    home = Path(os.path.abspath(home))
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HomeError(f"{path}: no such file; run `postvault init --home {home}` first") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: expected UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return load_config_text(text, home=home, source=str(path), environ=environ)


def load_config_text(text: str, *, home: Path, source: str,
                     environ: Mapping[str, str] | None = None) -> Config:
    """Parse and validate config ``text``; ``source`` names it in errors and
    relative paths resolve against ``home``."""
    home = Path(os.path.abspath(home))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {_describe_toml_error(exc, text)}") from None
    except RecursionError:
        # As in policy/load.py: tomllib recurses on nested arrays and tables.
        raise ConfigError(f"{source}: expected valid TOML, got arrays or tables nested too deeply") from None
    specs = list(keys())
    raw: dict[str, Any] = {}    # dotted key -> raw value, from the file or the environment
    where: dict[str, str] = {}  # dotted key -> the file, or the variable that set it
    _collect(data, source, specs, raw, where)
    _overlay_environment(os.environ if environ is None else environ, specs, raw, where)
    return _build(specs, raw, where, source, home)


def toml_error_position(exc: tomllib.TOMLDecodeError, text: str) -> tuple[int | None, int | None, str]:
    """(line, column, reason) of a TOML syntax error; column None at the end
    of the file, line None when tomllib gives no position. Python 3.11's
    tomllib has the position only at the end of its message."""
    message = str(exc)
    at = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if at:
        return int(at[2]), int(at[3]), at[1]
    end = re.fullmatch(r"(.*) \(at end of document\)", message, re.DOTALL)
    if end:
        return text.count("\n") + 1, None, end[1]
    return None, None, message


def _describe_toml_error(exc: tomllib.TOMLDecodeError, text: str) -> str:
    # The position goes to the front so the line reads like every other
    # config error.
    line, column, reason = toml_error_position(exc, text)
    if line is None:
        return f"expected valid TOML: {reason}"
    if column is None:
        return f"line {line} (end of file): expected valid TOML: {reason}"
    return f"line {line}, column {column}: expected valid TOML: {reason}"


def _collect(data: dict[str, Any], source: str, specs: list[KeySpec],
             raw: dict[str, Any], where: dict[str, str]) -> None:
    """Check the parsed TOML against the schema: names and types only."""
    by_dotted = {spec.dotted: spec for spec in specs}
    section_names = [sec.name for sec in sections()]
    for name, value in data.items():
        if name in section_names:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name}: expected a table [{name}], got {describe_value(value)}")
            entries = [(f"{name}.{key}", key, item) for key, item in value.items()]
        else:
            entries = [(name, name, value)]
        for dotted, key, item in entries:
            spec = by_dotted.get(dotted)
            if spec is None:
                kind = "section" if isinstance(item, dict) and dotted == name else "key"
                raise ConfigError(f"{source}: {dotted}: unknown {kind}{_suggest_key(dotted, specs)}")
            _check_type(spec, item, source)
            raw[dotted] = item
            where[dotted] = source


def _check_type(spec: KeySpec, value: Any, where: str) -> None:
    # type() is, not isinstance: bool is a subclass of int, and `true` is not 1.
    ok = type(value) is spec.type if spec.type in (int, bool) else isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: {spec.dotted}: expected {_TYPE_NAMES[spec.type]}, got {describe_value(value)}")


def _suggest_key(dotted: str, specs: list[KeySpec]) -> str:
    """A ', did you mean "x"?' hint for an unknown key or section, or ''."""
    section, _, name = dotted.rpartition(".")
    if section:
        candidates = {spec.name: spec.dotted for spec in specs if spec.section == section}
    else:
        candidates = {spec.name: spec.dotted for spec in specs if spec.section is None}
        candidates.update({sec.name: f"[{sec.name}]" for sec in sections()})
    close = difflib.get_close_matches(name, list(candidates), n=1)
    if close:
        return f', did you mean "{candidates[close[0]]}"?'
    # The right key in the wrong table, e.g. `relay` under [listen].
    elsewhere = [spec.dotted for spec in specs if spec.name == name]
    if elsewhere:
        return f', did you mean "{elsewhere[0]}"?'
    known = ", ".join(candidates)
    return f"; expected one of: {known}"


def _overlay_environment(environ: Mapping[str, str], specs: list[KeySpec],
                         raw: dict[str, Any], where: dict[str, str]) -> None:
    by_env = {spec.env: spec for spec in specs}
    # sorted: with several bad variables, report the same one every time.
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_CONFIG:
            continue
        spec = by_env.get(name)
        if spec is None:
            # Compare without the shared prefix, which would make everything look close.
            tails = [known[len(ENV_PREFIX):] for known in [*by_env, *sorted(ENV_NOT_CONFIG)]]
            close = difflib.get_close_matches(name[len(ENV_PREFIX):], tails, n=1)
            hint = (f", did you mean {ENV_PREFIX}{close[0]}?" if close else
                    "; expected POSTVAULT_<SECTION>_<KEY> naming a key of conf/postvault.toml")
            raise ConfigError(f"{name}: unknown environment variable{hint}")
        value: Any = environ[name]
        if spec.type is int:
            # Digits only: no sign, no underscores, no other scripts' digits.
            if not (value.isascii() and value.isdigit()):
                raise ConfigError(f"{name}: {spec.dotted}: expected an integer (digits only), got {quote(value)}")
            value = int(value)
        elif spec.type is bool:
            if value not in ("true", "false"):
                raise ConfigError(f"{name}: {spec.dotted}: expected true or false, got {quote(value)}")
            value = value == "true"
        raw[spec.dotted] = value
        where[spec.dotted] = name


def _build(specs: list[KeySpec], raw: dict[str, Any], where: dict[str, str],
           source: str, home: Path) -> Config:
    parsed: dict[str | None, dict[str, Any]] = {None: {}}
    hostname = ""
    # keys() yields top-level keys first, so hostname is known before the
    # defaults derived from it (notify.from) are needed.
    for spec in specs:
        origin = where.get(spec.dotted, source)
        value = raw[spec.dotted] if spec.dotted in raw else spec.default_for(hostname)
        if value is REQUIRED:
            raise ConfigError(f"{source}: {spec.dotted}: missing; expected {_expectation(spec, home)}"
                              f" (or set {spec.env})")
        try:
            typed = spec.parse(value, home)
        except Expected as exc:
            detail = f" ({exc.detail})" if exc.detail else ""
            raise ConfigError(f"{origin}: {spec.dotted}: expected {exc.expected}, "
                              f"got {_shown(spec, value)}{detail}") from None
        parsed.setdefault(spec.section, {})[spec.attr] = typed
        if spec.dotted == "hostname":
            hostname = typed
    tables = {sec.attr: sec.cls(**parsed.get(sec.name, {})) for sec in sections()}
    proxy = tables["proxy"]
    if proxy.listeners and not proxy.trusted:
        # Each key alone is valid; together they would refuse every connection.
        raise ConfigError(f"{where.get('proxy.trusted', source)}: proxy.trusted: expected at least one "
                          f"address or network when proxy.listeners is set, got \"\"")
    return Config(**parsed[None], **tables)


def _expectation(spec: KeySpec, home: Path) -> str:
    # A required key has no valid empty value, so its parser's complaint
    # about "" is exactly what the admin needs to write.
    try:
        spec.parse("", home)
    except Expected as exc:
        return exc.expected
    return _TYPE_NAMES[spec.type]


# --- rendering -------------------------------------------------------------


def render_default_config(hostname: str, overrides: Mapping[str, Any] | None = None) -> str:
    """The default ``conf/postvault.toml`` for ``hostname``: every key written
    out with its default and a comment from the schema; ``overrides`` (dotted
    key -> value, e.g. ``{"listen.imaps": "127.0.0.1:10993"}``) replace defaults."""
    if not is_dns_name(hostname):
        raise ConfigError(f'hostname: expected a DNS name such as "mail.example.test", got {quote(hostname)}')
    values = {spec.dotted: spec.default_for(hostname) for spec in keys()}
    values["hostname"] = hostname  # the one key without a schema default
    for key, value in (overrides or {}).items():
        if key not in values:
            raise ConfigError(f"{key}: not a config key")
        values[key] = value
    return _render(values, _HEADER, comments=True)


def show_config(config: Config) -> str:
    """The effective ``config`` as TOML, with every password replaced by ``***``."""
    values: dict[str, Any] = {}
    for spec in keys():
        owner = config if spec.section is None else getattr(config, spec.section)
        value = spec.show(getattr(owner, spec.attr))
        values[spec.dotted] = mask_secret(value) if spec.secret else value
    return _render(values, _SHOW_HEADER, comments=False)


def _render(values: Mapping[str, Any], header: str, *, comments: bool) -> str:
    lines = [f"# {line}".rstrip() for line in header.splitlines()]

    def comment(doc: str) -> None:
        if comments:
            lines.extend(f"# {line}" for line in textwrap.wrap(doc, 76))

    specs = list(keys())
    for spec in specs:
        if spec.section is None:
            lines.append("")
            comment(spec.doc)
            lines.append(f"{spec.name} = {_toml_value(values[spec.dotted])}")
    for sec in sections():
        lines.append("")
        comment(sec.doc)
        lines.append(f"[{sec.name}]")
        for spec in specs:
            if spec.section == sec.name:
                comment(spec.doc)
                lines.append(f"{spec.name} = {_toml_value(values[spec.dotted])}")
    return "\n".join(lines) + "\n"


# --- values in messages and files ------------------------------------------


def quote(text: str) -> str:
    """``text`` as a TOML basic string (also the form messages quote values in)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            # TOML forbids raw control characters in basic strings.
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, (str, int)):
        raise TypeError(f"schema values are strings, integers or booleans, not {type(value).__name__}")
    return quote(value) if isinstance(value, str) else str(value)


def _shown(spec: KeySpec, value: Any) -> str:
    # Error messages are public text: never echo a password.
    if isinstance(value, str):
        return quote(mask_secret(value) if spec.secret else value)
    return _toml_value(value) if isinstance(value, bool) else str(value)


def describe_value(value: Any) -> str:
    """A wrongly typed TOML value, named with its type."""
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, str):
        return f"the string {quote(mask_secret(value))}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (datetime.date, datetime.time)):
        return f"the date/time {value.isoformat()}"
    return type(value).__name__
