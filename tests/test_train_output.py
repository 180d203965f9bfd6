"""A training's output_dir: a second writer is refused while the first runs (real processes), and the
temporaries a killed run left are removed on the next start."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvd.config import ConfigError, load_config
from dvd.models.clip import create_clip
from dvd.train.clip import train_clip
from dvd.train.clip_config import ClipTrainConfig
from dvd.train.distributed import DistEnv
from dvd.train.output import claim_output_dir, remove_stale_temporaries

TINY = ["model=dvd-tiny-vit", "batch_size=8", "progress=false", "warmup_steps=1", "shuffle_buffer=16"]


def _clip_config(world: Path, out: Path, *extra: str) -> ClipTrainConfig:
    overrides = [f"data={world}", f"output_dir={out}", "recipe=clean", *TINY, *extra]
    return load_config(ClipTrainConfig, None, overrides)


def _clip_command(world: Path, out: Path, *extra: str) -> list[str]:
    args = [f"data={world}", f"output_dir={out}", "recipe=clean", *TINY, *extra]
    return [sys.executable, "-m", "dvd.cli", "train", "clip", *args]


def test_a_second_training_on_the_same_output_dir_is_refused_while_the_first_runs(shapesworld, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        _clip_command(shapesworld, out, "steps=100000", "checkpoint_every=100000"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first training ended before the second started"
        second = subprocess.run(
            _clip_command(shapesworld, out, "steps=1"), capture_output=True, text=True, timeout=120
        )
        assert first.poll() is None, "the second training stopped the first"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"dvd: error: output_dir {out} is being written by another training (pid {first.pid}); "
        "wait for it to finish or choose another output_dir"
    )


def test_the_lock_is_released_when_the_job_ends(tmp_path):
    with claim_output_dir(tmp_path / "run", DistEnv()):
        with pytest.raises(ConfigError, match="being written by another training"):
            with claim_output_dir(tmp_path / "run", DistEnv()):
                pass
    with claim_output_dir(tmp_path / "run", DistEnv()):
        pass


def test_an_output_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match="is a file; give a folder path"):
        with claim_output_dir(tmp_path / "taken", DistEnv()):
            pass


def test_temporaries_of_a_killed_run_are_removed_on_the_next_start(shapesworld, tmp_path):
    out = tmp_path / "run"
    litter = [
        out / ".tmp-final-k2j4" / "open_clip_model.safetensors",
        out / ".summary.json.abc123.tmp",
        out / ".final.x1y2.tmp" / "lm" / "model.safetensors",
        out / "checkpoints" / ".latest.q9.tmp",
        out / "checkpoints" / ".tmp-step-000000002-zz" / "train_state.pt",
    ]
    for path in litter:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    summary = train_clip(_clip_config(shapesworld, out, "steps=1"))
    assert Path(summary["final"]).is_dir()
    hidden = [p.name for folder in (out, out / "checkpoints") for p in folder.iterdir() if p.name[0] == "."]
    assert hidden == [".lock"]


def test_only_temporary_names_are_removed(tmp_path):
    keep = ["final", "checkpoints", "config.json", ".lock", ".hidden-notes"]
    for name in keep:
        (tmp_path / name).mkdir()
    (tmp_path / ".old-final").mkdir()
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".old-final"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_a_from_scratch_training_does_not_warn_that_no_pretrained_weights_were_loaded(
    shapesworld, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING):
        train_clip(_clip_config(shapesworld, tmp_path, "steps=1"))
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # outside training, open_clip's warning is left alone
        create_clip("dvd-tiny-vit")
    assert [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
