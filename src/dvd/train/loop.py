"""The training loop shared by the CLIP and VLM trainers: :func:`fit` runs the optimizer steps.

The trainer supplies the loss; gradient accumulation and clipping, autocast, non-finite steps
skipped and counted, logging, periodic evaluation and checkpoints happen here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dvd.train.checkpoint import Checkpointer
from dvd.train.distributed import DistEnv, all_true
from dvd.train.logger import MetricLogger
from dvd.train.precision import autocast
from dvd.train.schedule import CosineSchedule, NonFiniteGuard
from dvd.train.stream import DataStream, batch_size


@dataclass
class LoopSettings:
    """The knobs of :func:`fit` that every trainer exposes in its config."""

    steps: int
    accum_steps: int = 1
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    checkpoint_every: int = 100
    log_every: int = 10
    eval_every: int = 0
    stop_at: int | None = None  # end this invocation at this step (checkpointed); resume continues


@dataclass
class FitResult:
    step: int
    skipped: int
    seconds: float
    last: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepInfo:
    """Where a micro-batch sits: optimizer ``step`` (0-based), ``micro`` index, and whether to log."""

    step: int
    micro: int
    log: bool


LossFn = Callable[[Any, StepInfo], dict[str, Any]]


def fit(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: CosineSchedule,
    stream: DataStream,
    loss_fn: LossFn,
    settings: LoopSettings,
    env: DistEnv,
    checkpointer: Checkpointer | None = None,
    logger: MetricLogger | None = None,
    guard: NonFiniteGuard | None = None,
    scaler: torch.amp.GradScaler | None = None,
    start_step: int = 0,
    evaluate: Callable[[int], dict[str, float]] | None = None,
) -> FitResult:
    """Run optimizer steps ``start_step .. settings.steps`` and return where it stopped.

    ``loss_fn(batch, info)`` runs under autocast and returns a dict with ``"loss"`` (a scalar
    tensor to minimise) and any other scalars to log; ``info.log`` says whether this is a logging
    step (trainers compute costly diagnostics only then). A step whose loss or gradient
    norm is non-finite on any rank is skipped (no update) and counted.
    """
    guard = guard or NonFiniteGuard()
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    step = start_step
    started = time.perf_counter()
    last: dict[str, float] = {}
    window_samples, window_start = 0, time.perf_counter()
    device = env.device
    end = settings.steps if settings.stop_at is None else min(settings.steps, settings.stop_at)
    while step < end:
        lr = schedule.apply(step)
        is_log = settings.log_every > 0 and (step + 1) % settings.log_every == 0
        finite = True
        sums: dict[str, float] = {}
        for micro in range(settings.accum_steps):
            batch = next(stream)
            window_samples += batch_size(batch)
            skip_sync = ddp and micro < settings.accum_steps - 1  # DDP syncs gradients on the last one
            with model.no_sync() if skip_sync else contextlib.nullcontext():
                with autocast(settings.precision, device):
                    out = loss_fn(batch, StepInfo(step, micro, is_log))
                loss = out["loss"].float() / settings.accum_steps
                finite = finite and bool(torch.isfinite(loss).item())
                (scaler.scale(loss) if scaler is not None else loss).backward()
            for name, value in out.items():
                number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
                sums[name] = sums.get(name, 0.0) + number / settings.accum_steps
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip = settings.grad_clip if settings.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        grad_finite = bool(torch.isfinite(grad_norm).item())
        ok = all_true(finite and (grad_finite or scaler is not None), env)
        if ok:
            if scaler is not None:  # fp16 overflow: the scaler skips the update and lowers the scale
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        guard.record(step, ok)
        last = {f"train/{k}": v for k, v in sums.items()}
        last.update(
            {"train/lr": lr, "train/grad_norm": float(grad_norm), "train/skipped_steps": guard.skipped}
        )
        if logger is not None:
            if is_log or step == settings.steps:
                elapsed = time.perf_counter() - window_start
                last["train/images_per_s"] = window_samples * env.world_size / max(elapsed, 1e-9)
                window_samples, window_start = 0, time.perf_counter()
                logger.log(step, last, show=("train/loss", "train/lr"))
            logger.advance()
        if evaluate is not None and settings.eval_every > 0 and step % settings.eval_every == 0:
            scores = evaluate(step)
            if logger is not None and scores:
                logger.log(step, scores)
        if checkpointer is not None and (step % settings.checkpoint_every == 0 or step == end):
            checkpointer.save(step)
    return FitResult(step=step, skipped=guard.skipped, seconds=time.perf_counter() - started, last=last)
