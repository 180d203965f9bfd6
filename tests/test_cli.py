"""The ``dvd`` command dispatches to jobs and turns bad input into one-line errors."""

from __future__ import annotations

import importlib
import subprocess
import sys

from dvd.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dvd")
    listed = [line.split("  ")[1].strip() for line in out.splitlines() if line.startswith("  ")]
    assert listed == [" ".join(words) for words in COMMANDS]
    for command in ("demo", "data shapesworld", "train clip", "train vlm", "eval zeroshot", "eval retrieval",
                    "eval caption", "eval vqa", "eval pope", "eval targeted", "eval scienceqa", "eval mme",
                    "attack"):
        assert command in listed, command


def test_every_listed_command_has_a_module_with_a_cli():
    for module, _ in COMMANDS.values():
        assert callable(importlib.import_module(module).cli), module


def test_a_command_group_lists_its_commands(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dvd eval <command>")
    assert "eval zeroshot" in out and "eval targeted" in out and "train clip" not in out
    assert main(["train"]) == 2  # no job named: the group's list, as an error
    assert "train clip" in capsys.readouterr().err


def test_unknown_command_is_an_error_with_exit_code_2(capsys):
    assert main(["trian", "clip"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dvd: error: unknown command") and err.count("\n") == 1


def test_console_script_runs_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "dvd.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("dvd ")
