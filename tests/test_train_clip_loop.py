"""The shared training loop: schedule, non-finite steps, atomic checkpoints, safe loading, data position."""

from __future__ import annotations

import math
import pathlib
import random

import numpy as np
import pytest
import torch
from torch import nn

from dvd.config import ConfigError
from dvd.train.checkpoint import (
    Checkpointer,
    CheckpointManager,
    load_safetensors,
    load_trusted_state,
    save_safetensors,
)
from dvd.train.distributed import DistEnv
from dvd.train.loop import LoopSettings, StepInfo, fit
from dvd.train.rng import rng_state, set_rng_state
from dvd.train.schedule import CosineSchedule, NonFiniteGuard, TrainingDiverged
from dvd.train.stream import DataStream

ENV = DistEnv()


def toy():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optimizer


def stream_of(batches: int, *, segment_length: int | None = None) -> DataStream:
    def make(segment: int):
        g = torch.Generator().manual_seed(segment)
        return [torch.randn(4, 3, generator=g) + torch.rand(()) for _ in range(batches)]  # global RNG too

    return DataStream(make, ENV, segment_length=segment_length, seed=7)


def square_loss(model):
    return lambda batch, info: {"loss": model(batch).pow(2).mean()}


# ------------------------------------------------------------------------------------------ schedule


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_floor():
    _, optimizer = toy()
    schedule = CosineSchedule(optimizer, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = [schedule.apply(s) for s in range(15)]
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))
    assert lrs[14] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


# ------------------------------------------------------------------------------------------ non-finite


def test_a_schedule_configured_otherwise_refuses_the_saved_state_and_resumes_the_same_one():
    saved = CosineSchedule(toy()[1], warmup_steps=2, total_steps=9)
    saved.apply(5)
    longer = CosineSchedule(toy()[1], warmup_steps=2, total_steps=18)
    with pytest.raises(ConfigError, match="trained with steps=9 but this run has steps=18"):
        longer.load_state_dict(saved.state_dict())
    same = CosineSchedule(toy()[1], warmup_steps=2, total_steps=9)
    same.load_state_dict(saved.state_dict())
    assert same.step_index == 5


def test_non_finite_loss_skips_the_update_and_is_counted(tmp_path):
    model, optimizer = toy()
    schedule = CosineSchedule(optimizer, warmup_steps=0, total_steps=4)
    bad_steps = {1, 2}
    weights = []

    def loss_fn(batch, info: StepInfo):
        weights.append(model.weight.detach().clone())
        loss = model(batch).pow(2).mean()
        return {"loss": loss * float("nan") if info.step in bad_steps else loss}

    guard = NonFiniteGuard(max_in_a_row=3)
    result = fit(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        stream=stream_of(8),
        loss_fn=loss_fn,
        settings=LoopSettings(steps=4),
        env=ENV,
        guard=guard,
    )
    assert result.skipped == 2 and guard.in_a_row == 0
    assert torch.equal(weights[1], weights[2]) and torch.equal(weights[2], weights[3])  # no update from NaN
    assert not torch.equal(weights[0], weights[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_non_finite_steps_in_a_row_stop_the_run_naming_the_step():
    model, optimizer = toy()
    schedule = CosineSchedule(optimizer, warmup_steps=0, total_steps=10)

    def loss_fn(batch, info):
        return {"loss": model(batch).sum() * (float("inf") if info.step >= 2 else 1.0)}

    with pytest.raises(TrainingDiverged, match="stopping at step 5: non-finite .* in 3 steps in a row"):
        fit(
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            stream=stream_of(20),
            loss_fn=loss_fn,
            settings=LoopSettings(steps=10),
            env=ENV,
            guard=NonFiniteGuard(3),
        )


# ------------------------------------------------------------------------------------------ checkpoints


def save_step(manager: CheckpointManager, step: int, model, optimizer) -> None:
    manager.save(step, model=model, optimizer=optimizer, state={"data": {"segment": 0, "index": step}})


def test_half_written_checkpoint_is_never_picked_by_latest(tmp_path):
    model, optimizer = toy()
    manager = CheckpointManager(tmp_path, ENV, keep_last=5)
    save_step(manager, 2, model, optimizer)
    (tmp_path / ".tmp-step-000000004-abc").mkdir()  # a save killed mid-way
    (tmp_path / ".tmp-step-000000004-abc" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "step-000000006").mkdir()  # a folder without its meta.json is not complete
    assert manager.latest() == tmp_path / "step-000000002"
    (tmp_path / "latest").write_text("step-000000009\n")  # a pointer to something that is not there
    assert manager.latest() == tmp_path / "step-000000002"


def test_only_the_last_n_checkpoints_are_kept_and_stale_temp_folders_are_cleared(tmp_path):
    model, optimizer = toy()
    manager = CheckpointManager(tmp_path, ENV, keep_last=2)
    (tmp_path / ".tmp-step-000000001-old").mkdir(parents=True)
    for step in (1, 2, 3, 4):
        save_step(manager, step, model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000000003", "step-000000004"]
    assert (tmp_path / "latest").read_text().strip() == "step-000000004"


def test_nan_weights_are_never_saved(tmp_path):
    model, optimizer = toy()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    manager = CheckpointManager(tmp_path, ENV)
    with pytest.raises(TrainingDiverged, match="refusing to save step 3: non-finite weights in weight"):
        save_step(manager, 3, model, optimizer)
    assert manager.latest() is None and not any(tmp_path.glob("step-*"))


def test_tied_weights_are_saved_as_copies_and_read_back_equal(tmp_path):
    embedding = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight  # tied, as GPT-2's token embedding and LM head
    state = {"embed.weight": embedding.weight, "head.weight": head.weight}
    save_safetensors(state, tmp_path)
    loaded = load_safetensors(tmp_path)
    assert torch.equal(loaded["embed.weight"], embedding.weight.detach())
    assert torch.equal(loaded["head.weight"], embedding.weight.detach())


def test_train_state_is_weights_only_loadable_and_a_pickled_object_is_refused(tmp_path):
    model, optimizer = toy()
    manager = CheckpointManager(tmp_path, ENV)
    save_step(manager, 1, model, optimizer)
    state = load_trusted_state(tmp_path / "step-000000001" / "train_state.pt")
    assert state["step"] == 1 and state["data"] == [{"segment": 0, "index": 1}]
    torch.save(
        {"path": pathlib.PurePosixPath("x"), "step": 1}, tmp_path / "pickled.pt"
    )  # a class to unpickle
    with pytest.raises(ValueError, match="refusing it"):
        load_trusted_state(tmp_path / "pickled.pt")


def test_resuming_with_another_recipe_is_a_clear_error(tmp_path):
    model, optimizer = toy()
    CheckpointManager(tmp_path, ENV, fingerprint={"recipe": "delta"}).save(
        1, model=model, optimizer=optimizer, state={"data": {}}
    )
    other = CheckpointManager(tmp_path, ENV, fingerprint={"recipe": "clean"})
    with pytest.raises(ConfigError, match="recipe='delta' but this run has recipe='clean'"):
        other.load(other.latest(), model=model, optimizer=optimizer)


def test_rng_states_round_trip_for_torch_numpy_and_python():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("segment_length", [None, 3])
def test_data_stream_resumed_mid_segment_yields_the_same_batches(segment_length):
    whole = stream_of(5, segment_length=segment_length)
    expected = [next(whole) for _ in range(12)]  # crosses segment boundaries
    first = stream_of(5, segment_length=segment_length)
    seen = [next(first) for _ in range(7)]
    torch.rand(5)  # the training step draws from the global RNG in between
    resumed = stream_of(5, segment_length=segment_length)
    resumed.load_state_dict(first.state_dict())
    seen += [next(resumed) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(expected, seen, strict=True))


def test_fit_resumed_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    def run(steps_before_stop: int | None, directory):
        model, optimizer = toy()
        schedule = CosineSchedule(optimizer, warmup_steps=2, total_steps=9)
        stream, guard = stream_of(4), NonFiniteGuard()
        manager = CheckpointManager(directory, ENV, keep_last=2)
        checkpointer = Checkpointer(
            manager, model=model, optimizer=optimizer,
            states={"scheduler": schedule, "guard": guard, "data": stream},
        )
        start = checkpointer.resume("latest")

        def loss_fn(batch, info):
            noise = torch.randn(())  # global RNG in the step: restored on resume
            return {"loss": (model(batch) + noise).pow(2).mean()}

        steps = steps_before_stop or 9
        fit(
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            stream=stream,
            loss_fn=loss_fn,
            guard=guard,
            settings=LoopSettings(steps=steps, checkpoint_every=3),
            env=ENV,
            checkpointer=checkpointer,
            start_step=start,
        )
        return model.weight.detach().clone(), start

    uninterrupted, _ = run(None, tmp_path / "a")
    run(6, tmp_path / "b")  # stops after the step-6 checkpoint
    resumed, start = run(None, tmp_path / "b")
    assert start == 6 and torch.equal(uninterrupted, resumed)
    assert math.isfinite(float(resumed.sum()))


def test_two_accumulated_micro_batches_make_the_same_update_as_one_double_batch():
    def one_step(accum: int, batch: int) -> torch.Tensor:
        model, optimizer = toy()
        data = torch.randn(8, 3, generator=torch.Generator().manual_seed(3))
        chunks = [data[i : i + batch] for i in range(0, 8, batch)]
        stream = DataStream(lambda segment: chunks, ENV)
        schedule = CosineSchedule(optimizer, warmup_steps=0, total_steps=1)
        fit(
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            stream=stream,
            loss_fn=square_loss(model),
            settings=LoopSettings(steps=1, accum_steps=accum, grad_clip=None),
            env=ENV,
        )
        return model.weight.detach().clone()

    torch.testing.assert_close(one_step(2, 4), one_step(1, 8), rtol=0, atol=1e-7)
