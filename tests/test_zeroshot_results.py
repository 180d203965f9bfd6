"""dvd.eval.results: result rows merge atomically by key, read back exactly, print as a table."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dvd.eval.results import (
    ROW_KEYS,
    ResultRow,
    format_table,
    read_rows,
    remove_states,
    state_path,
    write_rows,
)


def row(**changes) -> ResultRow:
    base = ResultRow(
        model="tiny", task="zeroshot", dataset="photos", metric="accuracy", attack="apgd-ce", eps=4 / 255,
        steps=100, clean=0.5, adversarial=0.25, n=8, seconds=1.5, seed=0, flags=[], versions={"torch": "2"},
    )
    return dataclasses.replace(base, **changes)


def test_rows_have_exactly_the_design_keys_in_order() -> None:
    assert tuple(row().to_dict()) == ROW_KEYS
    assert ROW_KEYS == (
        "model", "task", "dataset", "metric", "attack", "eps", "steps",
        "clean", "adversarial", "n", "seconds", "seed", "flags", "versions", "skipped", "checkpoint",
        "protocol", "template",
    )


def test_write_rows_merges_by_key_and_replaces_reruns(tmp_path) -> None:
    path = tmp_path / "results.json"
    write_rows(path, [row(), row(eps=2 / 255)])
    write_rows(path, [row(model="other")])
    merged = write_rows(path, [row(adversarial=0.125)])  # a rerun of the first row replaces it in place
    assert [(r.model, r.eps, r.adversarial) for r in merged] == [
        ("tiny", 4 / 255, 0.125), ("tiny", 2 / 255, 0.25), ("other", 4 / 255, 0.25)
    ]
    assert read_rows(path) == merged
    assert json.loads(path.read_text())[0] == row(adversarial=0.125).to_dict()
    # no temp files left behind; the (empty) lock file of the read-merge-replace stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.json.lock", "results.json"]


def test_read_rows_names_the_missing_keys(tmp_path) -> None:
    path = tmp_path / "results.json"
    data = row().to_dict()
    del data["seconds"], data["flags"]
    path.write_text(json.dumps([data]))
    with pytest.raises(ValueError, match=r"row 0 lacks result keys seconds, flags"):
        read_rows(path)
    path.write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_rows(path)


def test_format_table_shows_budgets_on_the_255_grid_and_percentages() -> None:
    table = format_table([row(flags=["saturated_softmax"]), row(eps=0.0, attack="none", adversarial=None)])
    lines = table.splitlines()
    header = ["model", "dataset", "metric", "attack", "eps", "steps", "clean", "adversarial", "n", "flags"]
    assert lines[0].split() == header
    assert lines[2].split() == ["tiny", "photos", "accuracy", "apgd-ce", "4/255", "100", "50.0", "25.0", "8",
                                "saturated_softmax"]
    assert lines[3].split()[4:8] == ["0", "100", "50.0", "-"]


def test_state_files_are_removed_only_for_the_rows_given(tmp_path) -> None:
    fields = dict(task="zeroshot", model="tiny", dataset="photos", attack="apgd-ce", steps=100)
    mine = state_path(tmp_path / "s", **fields, eps=4 / 255)
    other = state_path(tmp_path / "s", **{**fields, "model": "other"}, eps=4 / 255)
    for path in (mine, other):
        path.parent.mkdir(exist_ok=True)
        path.write_text("{}")
    remove_states(tmp_path / "s", [row()])
    assert not mine.exists() and other.exists()
