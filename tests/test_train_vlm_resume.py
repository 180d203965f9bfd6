"""Real processes: a Δ² stage-2 run killed with SIGKILL and resumed ends bitwise where an uninterrupted run
ends, and a 2-process torchrun (gloo, CPU) Δ² stage-2 run trains, checkpoints and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _train_helpers import (
    assert_bitwise_equal,
    kill_after_first_checkpoint,
    module_command,
    run,
    torchrun_command,
)

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}
ARGS = [
    "stage=2", "adversarial=true", "attack_steps=2", "batch_size=8", "template=vicuna_v1_short",
    "lora=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0.1", "train_vision=true", "vision_lr=1e-5",
    "warmup_steps=1", "log_every=2", "keep_last=2", "progress=false", "device=cpu",
    "lm={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 128}",
]
MODULE = "dvd.train.vlm"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvd.data.shapesworld import generate

    root = tmp_path_factory.mktemp("vlm-resume")
    generate(
        root / "sw", seed=2, size=200, image_size=32, eval_size=16, instruct_size=48
    )  # 6 batches an epoch
    (root / "tiny_vit.json").write_text(json.dumps(TINY_VIT))
    return root


def args(world: Path, out: Path, *extra: str) -> list[str]:
    return [f"data={world / 'sw'}", f"vision={world / 'tiny_vit.json'}", f"output_dir={out}", *ARGS, *extra]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    final = out / "final"
    weights = {}
    for name in ("vision_tower.safetensors", "projector.safetensors", "lm/model.safetensors"):
        weights.update({f"{name}:{k}": v for k, v in load_file(str(final / name)).items()})
    return weights


def test_resume_after_sigkill_reproduces_the_uninterrupted_run_bitwise(world, tmp_path):
    # 8 steps of 8 cross the 6-batch epoch boundary; batches grouped by length, whose order is replayed too
    steps = ["steps=8", "checkpoint_every=2", "group_by_length=true"]
    whole = run(module_command(MODULE, args(world, tmp_path / "whole", *steps)))
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    kill_after_first_checkpoint(module_command(MODULE, args(world, out, *steps)), out / "checkpoints")
    assert not (out / "final").exists()
    resumed = run(module_command(MODULE, args(world, out, *steps, "resume=latest")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert 2 <= summary["resumed_from"] < 8 and summary["step"] == 8
    assert_bitwise_equal(final_weights(tmp_path / "whole"), final_weights(out))


def test_two_process_torchrun_adversarial_stage2_trains_checkpoints_and_resumes(world, tmp_path):
    grouped = "group_by_length=true"  # each rank takes its batch of every global batch
    first = run(torchrun_command(MODULE, args(world, tmp_path, "steps=4", "checkpoint_every=2", "stop_at=2",
                                              grouped)))
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "final").exists()
    state = torch.load(tmp_path / "checkpoints" / "step-000000002" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["data"][0] == state["data"][1] == {"segment": 0, "index": 2, "samples": 16}  # 3 an epoch
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    second = run(
        torchrun_command(MODULE, args(world, tmp_path, "steps=4", "checkpoint_every=2", "resume=latest",
                                      grouped))
    )
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == 2 and summary["step"] == 4
    logged = json.loads((tmp_path / "summary.json").read_text())["last"]
    assert logged["train/attack/loss_gain"] > 0 and logged["train/images_per_s"] > 0

    from dvd.models.vlm_io import load_vlm

    model = load_vlm(tmp_path / "final")
    assert not hasattr(model.lm, "peft_config")
    assert len(model.generate(torch.rand(2, 3, 32, 32), "What color is the circle?", max_new_tokens=3)) == 2


@pytest.mark.slow
def test_two_process_run_stopped_and_resumed_matches_the_uninterrupted_run(world, tmp_path):
    steps = ["steps=5", "checkpoint_every=2"]
    whole = run(torchrun_command(MODULE, args(world, tmp_path / "whole", *steps)))
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = run(torchrun_command(MODULE, args(world, tmp_path / "parts", *steps, "stop_at=3")))
    assert first.returncode == 0, first.stderr[-3000:]
    rest = run(torchrun_command(MODULE, args(world, tmp_path / "parts", *steps, "resume=latest")))
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert json.loads(rest.stdout.strip().splitlines()[-1])["resumed_from"] == 3
    assert_bitwise_equal(final_weights(tmp_path / "whole"), final_weights(tmp_path / "parts"))


@pytest.mark.slow
def test_fsdp_run_stopped_and_resumed_ends_where_a_ddp_run_ends(world, tmp_path):
    steps = ["steps=3", "checkpoint_every=2"]
    ddp = run(torchrun_command(MODULE, args(world, tmp_path / "ddp", *steps)))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = [*steps, "distributed=fsdp"]
    first = run(torchrun_command(MODULE, args(world, tmp_path / "fsdp", *fsdp, "stop_at=2")))
    assert first.returncode == 0, first.stderr[-3000:]
    rest = run(torchrun_command(MODULE, args(world, tmp_path / "fsdp", *fsdp, "resume=latest")))
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert json.loads(rest.stdout.strip().splitlines()[-1])["resumed_from"] == 2
    expected, got = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)


def test_a_branch_continues_its_parent_run_exactly_and_then_follows_its_own_recipe(world, tmp_path):
    # the clean parent: 6 steps, checkpoints at 3 and 6
    steps = ["steps=6", "checkpoint_every=3", "eps=4/255", "eps_warmup_steps=4"]
    parent = run(module_command(MODULE, args(world, tmp_path / "clean", *steps, "adversarial=false")))
    assert parent.returncode == 0, parent.stderr[-3000:]
    branch_point = tmp_path / "clean" / "checkpoints" / "step-000000003"

    # the same recipe from the branch point ends bitwise where the parent ended
    same = run(module_command(MODULE, args(world, tmp_path / "same", *steps, "adversarial=false",
                                           f"branch_from={branch_point}")))
    assert same.returncode == 0, same.stderr[-3000:]
    assert json.loads(same.stdout.strip().splitlines()[-1])["resumed_from"] == 3
    assert_bitwise_equal(final_weights(tmp_path / "clean"), final_weights(tmp_path / "same"))

    # Δ² from the branch point: its eps warm-up counts from step 3, so at the last step (5) it is still
    # ramping (an unbranched run with the same warm-up would be at the full 4/255 from step 3 on)
    delta2 = run(module_command(MODULE, args(world, tmp_path / "delta2", *steps, "adversarial=true",
                                             f"branch_from={branch_point}", "log_every=1")))
    assert delta2.returncode == 0, delta2.stderr[-3000:]
    last = json.loads((tmp_path / "delta2" / "summary.json").read_text())["last"]
    assert last["train/attack/eps"] == pytest.approx(4 / 255 * 3 / 4)
    assert last["train/attack/loss_gain"] > 0
    expected, got = final_weights(tmp_path / "clean"), final_weights(tmp_path / "delta2")
    assert any(not torch.equal(expected[key], got[key]) for key in expected)


def test_a_branch_refuses_another_schedule_or_a_folder_that_is_no_checkpoint(world, tmp_path):
    parent = run(module_command(MODULE, args(world, tmp_path / "p", "steps=2", "checkpoint_every=1")))
    assert parent.returncode == 0, parent.stderr[-3000:]
    point = tmp_path / "p" / "checkpoints" / "step-000000001"
    longer = run(module_command(MODULE, args(world, tmp_path / "b", "steps=4", f"branch_from={point}")))
    assert longer.returncode != 0 and "steps=2" in longer.stderr and "steps=4" in longer.stderr
    nowhere = run(module_command(MODULE, args(world, tmp_path / "c", "steps=2",
                                              f"branch_from={tmp_path / 'p'}")))
    assert nowhere.returncode != 0
    assert "is not a complete checkpoint folder" in nowhere.stderr.strip().splitlines()[-1]
