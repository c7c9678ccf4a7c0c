"""User-facing errors: the CLI prints these as one line and exits with code 2, no traceback; and the small
checks of user input that raise them."""

from __future__ import annotations

from typing import Iterable


class UserError(Exception):
    """A mistake in the user's input (missing file, bad class id, wrong size, corrupt image...).

    The message names the problem and says what to do; `spheregen` prints it as one line and exits 2.
    """


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """UserError unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_class_ids(ids: Iterable[int], num_classes: int) -> None:
    """UserError unless every id is a class of a model with `num_classes` classes (0: unconditional)."""
    ids = [int(i) for i in ids]
    if num_classes == 0 and ids:
        raise UserError("this model is unconditional (no classes); do not pass class ids")
    for i in ids:
        if not 0 <= i < num_classes:
            raise UserError(f"class id {i} is out of range; this model has classes 0..{num_classes - 1}")
