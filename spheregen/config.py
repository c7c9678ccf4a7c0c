"""Dataclass configs loaded from TOML, with `section.key=value` overrides from the command line.

The shipped configs live in the package (spheregen/configs/KIND/NAME.toml; the repository's configs/ is a link
to them), so `--config mnist_tiny` works from any directory; a path to any TOML file works too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from spheregen.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; an unknown key, or a value that
    does not fit its field's type (`int`, `float`, `bool`, `str`, `tuple[...]`, `X | None`), is a UserError."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{where or cls.__name__}' must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = coerce(value, hint, f"{where}{key}")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` checked against the type `hint` (ints widen to float, lists become tuples), else a UserError
    such as "model.lr must be a number (float), got 'abc'"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, name)
            except UserError:
                pass
        raise UserError(f"{name} must be {_describe(hint)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list ({_describe(hint)}), got {value!r}")
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise UserError(f"{name} must have {len(items)} entries ({_describe(hint)}), got {value!r}")
        return tuple(coerce(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if hint is Any or hint not in (int, float, str, bool):
        return value
    raise UserError(f"{name} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "unset"}
    if hint in words:
        return words[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return "a list of " + " / ".join(sorted({_describe(a) for a in args if a is not Ellipsis}))
    return " or ".join(_describe(a) for a in args) if args else str(hint)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON-friendly dict (tuples become lists)."""

    def clean(v):
        if isinstance(v, tuple):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); values use TOML syntax, bare words are strings."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like section.key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_toml(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a TOML file into a dict and apply `section.key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pick one from configs/")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return data


def installed_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed package (found without importing it), or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]).joinpath(*parts)
    return path if path.is_file() else None


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# `spheregen train KIND` -> the folder of its shipped configs
CONFIG_KINDS = {"tokenizer": "tokenizer", "ar": "ar", "sphere": "sphere", "distill": "distill"}


def shipped_configs(kind: str) -> list[str]:
    """Names of the configs shipped for a kind (the folder spheregen/configs/KIND)."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.toml"))


def config_path(kind: str, name: str | Path) -> Path:
    """A TOML file: `name` itself when it is a file, else the shipped config KIND/NAME(.toml)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".toml") else path.name
    shipped = CONFIG_DIR / kind / f"{stem}.toml"
    if shipped.is_file() and (len(path.parts) == 1 or path.parts[-2] == kind):
        return shipped
    raise UserError(f"config {name} is neither a file nor a shipped {kind} config; shipped: "
                    f"{', '.join(shipped_configs(kind)) or 'none'}")


def load_config(kind: str, name: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The parsed TOML of a shipped config name or a file, with `section.key=value` overrides applied."""
    return load_toml(config_path(kind, name), overrides)
