"""Real processes: a ΔCLIP run killed with SIGKILL and resumed ends bitwise where an uninterrupted run
ends, and a 2-process torchrun (gloo, CPU) run trains, checkpoints, resumes and exports open_clip weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ARGS = [
    "recipe=delta", "model=dvd-tiny-vit", "batch_size=12", "attack_steps=2", "warmup_steps=2",
    "progress=false", "shuffle_buffer=16", "log_every=2", "keep_last=2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvd.data.shapesworld import generate

    root = tmp_path_factory.mktemp("world") / "sw"
    generate(root, seed=1, size=64, image_size=32, eval_size=8, shard_size=16)  # 4 shards, 5 batches an epoch
    return root


def train_command(world: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dvd.train.clip", f"data={world}", f"output_dir={out}", *ARGS, *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "open_clip_model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_after_sigkill_reproduces_the_uninterrupted_run_bitwise(world, tmp_path):
    steps = ["steps=9", "checkpoint_every=2"]  # 9 steps of 12 cross the 5-batch epoch boundary
    subprocess.run(train_command(world, tmp_path / "whole", *steps), check=True, env=ENV, capture_output=True)

    out = tmp_path / "killed"
    process = subprocess.Popen(
        train_command(world, out, *steps), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pointer = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not pointer.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()

    done = subprocess.run(
        train_command(world, out, *steps, "resume=latest"),
        check=True,
        env=ENV,
        capture_output=True,
        text=True,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert 2 <= summary["resumed_from"] < 9 and summary["step"] == 9
    assert_bitwise_equal(weights(tmp_path / "whole" / "final"), weights(out / "final"))


def torchrun(world: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2`` on CPU (gloo); its whole process group dies on timeout."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "dvd.train.clip", f"data={world}", f"output_dir={out}", "device=cpu", *ARGS, *extra,
    ]
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_two_process_torchrun_delta_trains_checkpoints_resumes_and_loads_in_open_clip(world, tmp_path):
    first = torchrun(world, tmp_path, "steps=6", "checkpoint_every=2", "stop_at=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "final").exists()
    state = torch.load(tmp_path / "checkpoints" / "step-000000004" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["data"][0] == state["data"][1] == {"segment": 1, "index": 2, "samples": 48}  # 2 an epoch
    ranks_differ = not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert ranks_differ  # each rank has its own RNG stream, saved and restored per rank

    second = torchrun(world, tmp_path, "steps=6", "checkpoint_every=2", "resume=latest")
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == 4 and summary["step"] == 6
    assert (tmp_path / "checkpoints" / "step-000000006").is_dir()

    import open_clip

    from dvd.models.clip import load_clip

    images = torch.rand(3, 3, 32, 32)
    plain = open_clip.create_model(f"local-dir:{tmp_path / 'final'}").eval()
    mean = torch.tensor(plain.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(plain.visual.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = load_clip(tmp_path / "final").encode_image(images)
        got = torch.nn.functional.normalize(plain.encode_image((images - mean) / std), dim=-1)
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_matches_the_uninterrupted_run(world, tmp_path):
    whole = torchrun(world, tmp_path / "whole", "steps=6", "checkpoint_every=2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = torchrun(world, tmp_path / "parts", "steps=6", "checkpoint_every=2", "stop_at=3")
    assert first.returncode == 0, first.stderr[-3000:]
    rest = torchrun(world, tmp_path / "parts", "steps=6", "checkpoint_every=2", "resume=latest")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert json.loads(rest.stdout.strip().splitlines()[-1])["resumed_from"] == 3
    assert_bitwise_equal(weights(tmp_path / "whole" / "final"), weights(tmp_path / "parts" / "final"))


@pytest.mark.slow
def test_two_process_fsdp_run_matches_the_ddp_run(world, tmp_path):
    ddp = torchrun(world, tmp_path / "ddp", "steps=3", "checkpoint_every=3")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = torchrun(world, tmp_path / "fsdp", "steps=3", "checkpoint_every=3", "distributed=fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    a, b = weights(tmp_path / "ddp" / "final"), weights(tmp_path / "fsdp" / "final")
    assert a.keys() == b.keys()
    for key in a:  # same maths, different reduction order
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
