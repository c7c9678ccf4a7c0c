"""The `spheregen` command: every subcommand is wired, and user mistakes give one line and exit 2."""

import subprocess
import sys

import pytest

from spheregen.cli import build_parser, main
from spheregen.config import load_toml, parse_override


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("data", "train", "demo"):
        assert cmd in out


def test_every_command_has_a_handler():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert len(sub.choices) >= 3
    for name, p in sub.choices.items():
        has_func = p.get_default("func") is not None
        nested = [a for a in p._actions if getattr(a, "choices", None) and isinstance(a.choices, dict)]
        assert has_func or nested, name


def test_missing_config_is_one_line_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "spheregen.cli", "train", "tokenizer", "--config",
                          str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "nope.toml" in res.stderr
    assert "Traceback" not in res.stderr


def test_overrides_and_bad_toml(tmp_path, capsys):
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("model.posterior=spherical") == (["model", "posterior"], "spherical")
    assert parse_override("model.channels=[32, 64]") == (["model", "channels"], [32, 64])
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlr = 1e-4\nsteps = 10\n")
    cfg = load_toml(f, ["train.steps=20", "data.path=x"])
    assert cfg == {"train": {"lr": 1e-4, "steps": 20}, "data": {"path": "x"}}
    f.write_text("[train\nlr = ")
    assert main(["train", "tokenizer", "--config", str(f)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_every_help_shows_the_defaults():
    """Each option with a default (not None / False / []) says it in its command's --help."""
    import argparse

    from spheregen.cli import build_parser

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from parsers(sub)

    missing = []
    for p in parsers(build_parser(None)):
        text = " ".join(p.format_help().split())
        for a in p._actions:
            d = a.default
            if not a.option_strings or d is None or d is False or d == [] or d == argparse.SUPPRESS:
                continue
            if f"default: {d}" not in text and "default" not in (a.help or ""):
                missing.append(f"{p.prog} {a.option_strings[0]}")
    assert not missing, missing
