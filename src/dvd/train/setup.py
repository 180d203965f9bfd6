"""The one training set-up of ``dvd train clip`` and ``dvd train vlm``: from optimizer to summary.

A trainer builds its model, loss and data into a :class:`Job`; :func:`run_job` adds what every
training has (AdamW, the cosine schedule, the non-finite guard, the loss scaler, the resumable data
stream, checkpoints with every stateful part registered once, logging), runs :func:`fit`, exports
the final model and writes ``summary.json``. The config supplies the shared knobs by name
(:class:`LoopConfig`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dvd.config import to_dict
from dvd.io import versions, write_json
from dvd.train.checkpoint import Checkpointer, CheckpointManager, load_safetensors, save_safetensors
from dvd.train.distributed import DistEnv, barrier, is_fsdp, setup_distributed, teardown_distributed
from dvd.train.logger import MetricLogger
from dvd.train.loop import LoopSettings, LossFn, fit
from dvd.train.output import claim_output_dir
from dvd.train.precision import grad_scaler, training_precision
from dvd.train.schedule import CosineSchedule, NonFiniteGuard
from dvd.train.stream import DataStream


class LoopConfig(Protocol):
    """The fields every training config has (``ClipTrainConfig``, ``VlmTrainConfig``)."""

    output_dir: str
    device: str
    precision: str
    seed: int
    accum_steps: int
    lr: float
    min_lr_ratio: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    grad_clip: float | None
    checkpoint_every: int
    keep_last: int
    resume: str | None
    branch_from: str | None
    stop_at: int | None
    log_every: int
    max_nonfinite_in_a_row: int
    progress: bool


@dataclass
class Job:
    """What a trainer brings to the shared set-up; everything else comes from its config."""

    model: nn.Module  # wrapped for the ranks (DDP / FSDP)
    groups: list[dict[str, Any]]  # optimizer parameter groups
    loss_fn: LossFn
    make_loader: Callable[[int], Iterable[Any]]  # segment -> batches (see DataStream)
    data_name: str
    steps: int
    warmup_steps: int
    fingerprint: dict[str, Any]  # what must match on resume
    description: str  # the progress bar's
    export: Callable[[Path], None]  # writes the final model (collective; rank 0 writes)
    segment_length: int | None = None
    eval_every: int = 0
    evaluate: Callable[[int], dict[str, float]] | None = None
    save_weights: Callable[[dict[str, torch.Tensor], Path], None] = save_safetensors
    load_weights: Callable[[Path], dict[str, torch.Tensor]] = load_safetensors
    summary: Callable[[], dict[str, Any]] = field(default=dict)  # trainer-specific summary entries
    branchable: tuple[str, ...] = ()  # fingerprint keys a run started by ``branch_from`` may change


def adamw(model: nn.Module, groups: Any, **options: Any) -> torch.optim.AdamW:
    """AdamW over ``groups``, fused into one kernel per step where PyTorch has one (CPU and CUDA
    parameters; not FSDP's sharded ones): on CPU ~10x faster than the per-tensor loop for a tiny
    CLIP's many small tensors and its 49k-token embedding."""
    devices = {p.device.type for p in model.parameters()}
    fused = not is_fsdp(model) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, fused=fused or None, **options)


@contextlib.contextmanager
def training_process(cfg: LoopConfig) -> Iterator[DistEnv]:
    """This process's place among the torchrun ranks, holding ``output_dir`` for the job."""
    env = setup_distributed(cfg.device)
    try:
        with claim_output_dir(cfg.output_dir, env):
            yield env
    finally:
        teardown_distributed()


def train_job(cfg: LoopConfig, make_job: Callable[[Any, DistEnv], Job]) -> dict[str, Any]:
    """Run the job ``make_job(cfg, env)`` builds for a checked ``cfg`` (a :class:`LoopConfig`) in this
    process (single process or under torchrun); returns the summary."""
    with training_process(cfg) as env:
        precision = training_precision(cfg.precision, env.device)
        return run_job(cfg, env, precision, make_job(cfg, env))


def run_job(cfg: LoopConfig, env: DistEnv, precision: str, job: Job) -> dict[str, Any]:
    """Train ``job`` to ``job.steps`` (or ``cfg.stop_at``), resuming when asked; returns the summary."""
    out = Path(cfg.output_dir)
    optimizer = adamw(
        job.model, job.groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
    )
    schedule = CosineSchedule(
        optimizer, warmup_steps=job.warmup_steps, total_steps=job.steps, min_lr_ratio=cfg.min_lr_ratio
    )
    guard = NonFiniteGuard(cfg.max_nonfinite_in_a_row)
    scaler = grad_scaler(precision, env.device)
    stream = DataStream(
        job.make_loader, env, segment_length=job.segment_length, name=job.data_name, seed=cfg.seed
    )
    manager = CheckpointManager(
        out / "checkpoints", env, keep_last=cfg.keep_last, fingerprint=job.fingerprint, config=to_dict(cfg),
        save_weights=job.save_weights, load_weights=job.load_weights,
    )
    states: dict[str, Any] = {"scheduler": schedule, "guard": guard, "data": stream}
    if scaler is not None:
        states["scaler"] = scaler
    checkpointer = Checkpointer(manager, model=job.model, optimizer=optimizer, states=states)
    start = checkpointer.resume(cfg.resume, branch_from=cfg.branch_from, may_differ=job.branchable)
    if env.is_main:
        write_json(out / "config.json", {
            "config": to_dict(cfg), "steps": job.steps, "warmup_steps": job.warmup_steps,
            "precision": precision, "world_size": env.world_size, "versions": versions(),
        })
    logger = MetricLogger(
        out / "tensorboard", env, total=job.steps, start=start, progress=cfg.progress,
        description=job.description,
    )
    settings = LoopSettings(
        steps=job.steps, accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip, precision=precision,
        checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, eval_every=job.eval_every,
        stop_at=cfg.stop_at,
    )
    try:
        result = fit(
            model=job.model, optimizer=optimizer, schedule=schedule, stream=stream, loss_fn=job.loss_fn,
            settings=settings, env=env, checkpointer=checkpointer, logger=logger, guard=guard, scaler=scaler,
            start_step=start, evaluate=job.evaluate,
        )
    finally:
        logger.close()
    finished = result.step >= job.steps
    final = out / "final"
    if finished:  # a stopped (stop_at) run leaves only its checkpoint; the export waits for the end
        job.export(final)
    summary = {
        "step": result.step, "steps": job.steps, "skipped_steps": result.skipped,
        "final": str(final) if finished else None, "resumed_from": start,
        "seconds": round(result.seconds, 3), **job.summary(), "last": result.last,
    }
    if env.is_main:
        write_json(out / "summary.json", summary)
    barrier(env)
    return summary
