"""What every training setup shares: filling a model config's data-derived fields from the data."""

from __future__ import annotations

from typing import Any

from spheregen.errors import UserError


def fill_from_data(model: dict[str, Any], found: dict[str, Any], source: str,
                   keep_zero: tuple[str, ...] = ()) -> dict[str, Any]:
    """[model] table with each key of `found` (read off the data) filled in where it is missing or None; a value
    the config sets must agree (floats to 1e-6). Keys in `keep_zero` may be 0 in the config whatever the data
    says (an unconditional model trained on labelled data)."""
    model = dict(model)
    for key, value in found.items():
        given = model.get(key)
        if given is None or (key in keep_zero and given == 0):
            model[key] = value if given is None else given
            continue
        same = abs(given - value) <= 1e-6 if isinstance(value, float) else _plain(given) == _plain(value)
        if not same:
            raise UserError(f"model.{key} = {given} in the config, but {source} has {value}; remove it from "
                            "[model] or use matching data")
    return model


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def data_path(config: dict) -> str:
    """data.path of the config, or a UserError saying how to give it."""
    path = config.get("data", {}).get("path")
    if not path:
        raise UserError("no dataset: set data.path in the config or pass --data DIR")
    return path
