"""The ``dvd`` command dispatches to jobs and turns bad input into one-line errors."""

from __future__ import annotations

import subprocess
import sys

from dvd.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    assert "usage: dvd" in capsys.readouterr().out


def test_unknown_command_is_an_error_with_exit_code_2(capsys):
    assert main(["trian", "clip"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dvd: error: unknown command") and err.count("\n") == 1


def test_console_script_runs_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "dvd.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("dvd ")
