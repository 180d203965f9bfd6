"""dvd eval zeroshot --attack: AutoAttack's standard set, comma lists of dvd's attacks, --eot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvd.cli import main
from dvd.config import ConfigError
from dvd.eval.zeroshot import resolve_attacks
from test_zeroshot import photos  # noqa: F401  (fixture)


def test_attack_names_resolve_to_ensembles():
    assert resolve_attacks("aa") == ("apgd-ce", "apgd-t")
    assert resolve_attacks("aa-standard") == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert resolve_attacks("apgd-ce,fab-t") == ("apgd-ce", "fab-t")
    with pytest.raises(ConfigError, match="unknown attack 'fab' \\(did you mean"):
        resolve_attacks("apgd-ce,fab")


def test_cli_runs_a_comma_list_of_attacks_and_names_it_in_the_rows(photos: Path, tmp_path: Path):  # noqa: F811
    out = tmp_path / "results.json"
    args = ["eval", "zeroshot", "--model", "dvd-tiny-vit", "--dataset", str(photos), "--eps", "8/255",
            "--attack", "apgd-ce,fab-t", "--steps", "3", "--limit", "4", "--eot", "1", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    (row,) = json.loads(out.read_text())
    assert row["attack"] == "apgd-ce,fab-t" and row["n"] == 4
    assert 0 <= row["adversarial"] <= row["clean"]


def test_cli_refuses_a_bad_eot(photos: Path, tmp_path: Path, capsys):  # noqa: F811
    args = ["eval", "zeroshot", "--model", "dvd-tiny-vit", "--dataset", str(photos), "--eot", "0",
            "--out", str(tmp_path / "r.json")]
    assert main(args) != 0
    assert "--eot must be >= 1" in capsys.readouterr().err
