"""The results file on disk: concurrent writers keep every row, bad --out paths fail before any work,
litter of killed runs is removed by the next run, and two checkpoints never share a row key."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dvd.cli import main
from dvd.config import ConfigError
from dvd.eval.output import check_output_path, claim_output
from dvd.eval.results import ResultRow, read_rows, write_rows
from dvd.io import _writer

SRC = str(Path(__file__).parents[1] / "src")


def row(**changes) -> ResultRow:
    base = ResultRow(
        model="tiny", task="zeroshot", dataset="photos", metric="accuracy", attack="apgd-ce", eps=4 / 255,
        steps=100, clean=0.5, adversarial=0.25, n=8, seconds=1.5, seed=0, flags=[], versions={"torch": "2"},
    )
    return dataclasses.replace(base, **changes)


def _write_many(path: str, writer: int, count: int) -> None:
    for i in range(count):
        write_rows(path, [row(model=f"writer{writer}", dataset=f"set{i}")])


def test_concurrent_writers_of_one_file_keep_every_row(tmp_path: Path) -> None:
    path = str(tmp_path / "results.json")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(path, w, 40)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    rows = read_rows(path)
    assert len(rows) == 120
    expected = {(f"writer{w}", f"set{i}") for w in range(3) for i in range(40)}
    assert {(r.model, r.dataset) for r in rows} == expected


def test_rows_written_before_skipped_and_checkpoint_existed_still_read(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    old = row().to_dict()
    del old["skipped"], old["checkpoint"]
    path.write_text(json.dumps([old]))
    (read,) = read_rows(path)
    assert (read.skipped, read.checkpoint) == (0, "")


def test_two_checkpoints_never_share_a_row_key(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_rows(path, [row(checkpoint="/runs/a/final")])
    write_rows(path, [row(checkpoint="/runs/a/final", clean=0.75)])  # a rerun of the same model replaces
    with pytest.raises(ValueError, match=r"has rows of model 'tiny' from /runs/a/final.*--model-name"):
        write_rows(path, [row(checkpoint="/runs/b/final")])
    assert [(r.checkpoint, r.clean) for r in read_rows(path)] == [("/runs/a/final", 0.75)]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "f").write_text("x") and d / "f" / "r.json", r"f is a file, not a directory"),
        (lambda d: d, r"is a directory; give a file path such as"),
    ],
)
def test_unusable_out_paths_are_one_line_errors(tmp_path: Path, make, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check_output_path(make(tmp_path))


def test_a_bad_out_is_refused_before_the_model_is_even_loaded(tmp_path: Path, capsys) -> None:
    (tmp_path / "f").write_text("x")
    code = main(["eval", "zeroshot", "--model", "no-such-model-name", "--dataset", str(tmp_path),
                 "--out", str(tmp_path / "f" / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is a file, not a directory" in err


def _killed_mid_write(target: Path) -> None:
    """Run a writer of ``target`` that is kill -9'ed while its temporary is half written."""
    code = f"""
import sys, time
sys.path.insert(0, {SRC!r})
from dvd.io import atomic_write
def write(tmp):
    tmp.write_text("half"); print("writing", flush=True); time.sleep(60)
atomic_write({str(target)!r}, write)
"""
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()


def test_the_next_run_removes_temporaries_of_a_killed_one(tmp_path: Path) -> None:
    out = tmp_path / "R.json"
    write_rows(out, [row()])
    state = tmp_path / "R.json.partial" / "zeroshot__tiny__eps0.01568627.json"
    _killed_mid_write(out)
    _killed_mid_write(state)
    assert len(list(tmp_path.glob(".R.json.*.tmp"))) == len(list(state.parent.glob(".*.tmp"))) == 1
    live = tmp_path / f".R.json.{_writer()}.abcd1234.tmp"  # this process, writing right now
    live.write_text("being written")
    state.write_text("{}")  # a resumable state: the rerun of the killed command continues from it
    claim_output(out)
    assert not list(state.parent.glob(".*.tmp")) and list(tmp_path.glob(".R.json.*.tmp")) == [live]
    assert state.is_file() and read_rows(out) == [row()]
