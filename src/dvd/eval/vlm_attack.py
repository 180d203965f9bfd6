"""The resumable batched loop shared by the VLM evaluations: greedy outputs per sample, clean and under the
worst-case ensemble (:mod:`dvd.eval.vlm_ensemble`), per budget.

Every output is stored, so the final per-sample minimum is taken again under the final scorer and
robust <= clean by construction. :func:`reference_outputs` (captioning, VQA) and :func:`answer_outputs`
(POPE, ScienceQA) choose the attack stages of the two kinds of evaluation. The objective and ensemble
live in :mod:`dvd.eval.vlm_objective` and :mod:`dvd.eval.vlm_ensemble`, the command-line side in
:mod:`dvd.eval.vlm_cli`; their names are re-exported here, where the evaluations find them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dvd.eval.batching import evaluation_mode, run_batches
from dvd.eval.results import ResultRow, eps_text, state_path
from dvd.eval.samples import output_records, writer_for
from dvd.eval.spec import EvalSpec
from dvd.eval.vlm_cli import (
    DEFAULT_EPS,
    add_vlm_arguments,
    broken_at,
    finish,
    load_from_args,
    load_model,
    model_name_of,
    parse_vlm,
)
from dvd.eval.vlm_ensemble import Score, Stage, WorstCase, ensemble_stages, worst_case_attack
from dvd.eval.vlm_objective import (
    BALL_TOLERANCE,
    DTYPES,
    PRECISIONS,
    AnswerNLL,
    answer_objective,
    attack_answers,
    check_in_ball,
    resolve_precision,
)
from dvd.models.vlm_base import VisionLanguageModel

__all__ = [
    "BALL_TOLERANCE",
    "DEFAULT_EPS",
    "DTYPES",
    "PRECISIONS",
    "REFERENCE_ATTACKS",
    "REFERENCE_ATTACK_NAMES",
    "AnswerNLL",
    "BudgetResult",
    "SampleTask",
    "Score",
    "Stage",
    "WorstCase",
    "add_vlm_arguments",
    "answer_objective",
    "answer_outputs",
    "attack_answers",
    "batch_outputs",
    "budget_rows",
    "broken_at",
    "check_in_ball",
    "ensemble_stages",
    "evaluate_outputs",
    "finish",
    "fingerprint",
    "load_from_args",
    "load_model",
    "model_name_of",
    "parse_vlm",
    "reference_outputs",
    "resolve_precision",
    "run_batches",
    "worst_case_attack",
]


class SampleTask(Protocol):
    """What an evaluation says about each dataset item (a dict from a dvd reader)."""

    def prompt(self, item: dict[str, Any]) -> str:
        """The user message for the item's image."""
        ...

    def references(self, position: int, item: dict[str, Any]) -> list[str]:
        """The answers whose NLL the untargeted attacks maximise, most important first."""
        ...

    def score(self, position: int, item: dict[str, Any], text: str) -> float:
        """How good a generated text is (lower = more broken)."""
        ...

    def record(self, position: int, item: dict[str, Any]) -> dict[str, Any]:
        """JSON-able fields identifying the item in the saved state (ids, labels)."""
        ...


@dataclass
class QuestionTask:
    """The prompt of a question-answering :class:`SampleTask`: the item's question, then ``suffix``."""

    suffix: str

    def prompt(self, item: dict[str, Any]) -> str:
        return item["question"] + self.suffix


@dataclass
class BudgetResult:
    """The outputs of one budget: ``samples`` (dicts with ``position``, ``outputs`` (clean first) and the
    task's own fields), the row's ``attack`` name and ``steps``, the wall time and the unreadable samples
    left out."""

    eps: float
    attack: str
    steps: int
    samples: list[dict[str, Any]]
    seconds: float
    skipped: int = 0


def batch_outputs(
    model: VisionLanguageModel,
    task: SampleTask,
    positions: list[int],
    items: list[dict[str, Any]],
    *,
    eps: float,
    stages: Sequence[Stage],
    steps: int,
    broken_at: float,
    seed: int,
    max_new_tokens: int,
    writer: Any = None,
) -> list[dict[str, Any]]:
    """The records of one batch: the task's fields, ``position`` and ``outputs`` (clean only without
    ``stages``, else clean then every attacked output of :func:`worst_case_attack`). A ``writer``
    (:class:`dvd.eval.samples.SampleWriter`) also gets each sample's record and worst-case image."""
    images = torch.stack([item["image"] for item in items]).to(model.device)
    prompts = [task.prompt(item) for item in items]
    worst_case = None
    if stages:

        def score(index: Sequence[int], texts: Sequence[str]) -> list[float]:
            return [task.score(positions[i], items[i], text) for i, text in zip(index, texts, strict=True)]

        worst_case = worst_case_attack(
            model,
            images,
            prompts,
            [task.references(p, item) for p, item in zip(positions, items, strict=True)],
            score,
            eps=eps,
            steps=steps,
            stages=stages,
            broken_at=broken_at,
            # seeded by the batch's first sample: a resumed run draws the same numbers
            generator=torch.Generator(device=model.device).manual_seed(seed + positions[0]),
            max_new_tokens=max_new_tokens,
        )
        outputs = worst_case.outputs
    else:
        outputs = [[text] for text in model.generate(images, prompts, max_new_tokens=max_new_tokens)]
    if writer is not None:
        writer.write(output_records(task, positions, items, outputs, worst_case),
                     None if worst_case is None else worst_case.images)
    return [
        {**task.record(p, item), "position": p, "outputs": out}
        for p, item, out in zip(positions, items, outputs, strict=True)
    ]



def evaluate_outputs(
    model: VisionLanguageModel,
    data: Any,
    task: SampleTask,
    *,
    spec: EvalSpec,
    task_name: str,
    attack: str,
    stages: Sequence[Stage],
    settings: dict[str, Any],
    broken_at: float = 0.0,
    max_new_tokens: int | None = None,
) -> list[BudgetResult]:
    """Greedy outputs for every item of ``data``, clean and under the worst-case ensemble, per budget of
    ``spec.eps_list`` (``attack`` is the rows' attack name; no ``stages``: the clean outputs only, at eps 0).

    ``settings`` (everything else the outputs depend on) goes into the resume key; the model is in eval
    mode with frozen parameters meanwhile. ``spec.save_samples``: a directory for per-sample records and
    worst-case images (:mod:`dvd.eval.samples`). ``max_new_tokens`` defaults to the spec's.
    """
    if max_new_tokens is None:
        max_new_tokens = spec.max_new_tokens
    eps_list = spec.eps_list if stages else [0.0]
    results = []
    with evaluation_mode(model):
        key = {
            "task": task_name,
            "model_name": spec.model_name,
            "dataset_name": spec.dataset_name,
            "attack": attack,
            "stages": [dataclasses.asdict(s) for s in stages],
            "steps": spec.steps,
            "broken_at": broken_at,
            "max_new_tokens": max_new_tokens,
            "batch_size": spec.batch_size,
            "limit": spec.limit,
            "seed": spec.seed,
            "fingerprint": fingerprint(model),
            **settings,
        }
        for eps in eps_list:
            attacked = eps > 0 and bool(stages)
            name, budget_steps = (attack, spec.steps) if attacked else ("none", 0)
            evaluate_batch = functools.partial(
                batch_outputs,
                model,
                task,
                eps=eps,
                stages=stages if attacked else [],
                steps=spec.steps,
                broken_at=broken_at,
                seed=spec.seed,
                max_new_tokens=max_new_tokens,
                writer=writer_for(spec.save_samples, task=task_name, model=spec.model_name,
                                  dataset=spec.dataset_name, attack=name, eps=eps),
            )
            state_file = None
            if spec.state_dir is not None:
                state_file = state_path(spec.state_dir, task=task_name, model=spec.model_name,
                                        dataset=spec.dataset_name, attack=name, steps=budget_steps, eps=eps)
            state = run_batches(
                data,
                evaluate_batch,
                key={**key, "eps": eps},
                state_file=state_file,
                batch_size=spec.batch_size,
                limit=spec.limit,
                progress=spec.progress,
                label=f"{spec.dataset_name} {name} eps={eps_text(eps)}",
            )
            results.append(
                BudgetResult(eps, name, budget_steps, state["samples"], state["seconds"], state["skipped"])
            )
    return results


# the attacks of the reference-answer evaluations (captioning, VQA) and their rows' attack names
REFERENCE_ATTACKS = ("ensemble", "references", "apgd", "none")
REFERENCE_ATTACK_NAMES = {
    "ensemble": "apgd-ensemble", "references": "apgd-references", "apgd": "apgd", "none": "none"
}


def reference_outputs(
    model: VisionLanguageModel,
    data: Any,
    task: SampleTask,
    *,
    spec: EvalSpec,
    task_name: str,
    n_references: int,
    broken_at: float,
    settings: dict[str, Any],
    targets: Sequence[str] = (),
) -> list[BudgetResult]:
    """:func:`evaluate_outputs` of a reference-answer evaluation, ``spec.attack`` one of
    :data:`REFERENCE_ATTACKS`: "ensemble" is the paper's (:func:`ensemble_stages` of ``n_references`` in
    ``spec.precision``, then ``targets``), "references" its first part (one APGD per reference, without the
    fp32 rerun and the targeted runs), "apgd" one fp32 APGD on the first reference, "none" clean only."""
    precision = resolve_precision(spec.precision, model.device)
    stages = {
        "ensemble": ensemble_stages(n_references, precision=precision, targets=targets),
        "references": ensemble_stages(n_references, precision=precision, final=False),
        "apgd": [Stage("ref0-fp32")],
        "none": [],
    }[spec.attack]
    attack = REFERENCE_ATTACK_NAMES[spec.attack]
    return evaluate_outputs(
        model, data, task, spec=spec, task_name=task_name, attack=attack, stages=stages, broken_at=broken_at,
        settings=settings,
    )


def answer_outputs(
    model: VisionLanguageModel,
    data: Any,
    task: SampleTask,
    *,
    spec: EvalSpec,
    task_name: str,
    stage: str,
    settings: dict[str, Any],
) -> list[BudgetResult]:
    """:func:`evaluate_outputs` of a right-answer evaluation (POPE, ScienceQA): clean for ``spec.attack``
    "none", else one APGD (the stage named ``stage``, in ``spec.precision``) on the right answer's NLL."""
    attack = Stage(stage, precision=resolve_precision(spec.precision, model.device))
    stages = [attack] if spec.attack != "none" else []
    return evaluate_outputs(
        model, data, task, spec=spec, task_name=task_name, attack=spec.attack, stages=stages,
        settings=settings,
    )


def budget_rows(
    spec: EvalSpec, budget: BudgetResult, task: str, values: dict[str, tuple[float, float]], n: int
) -> list[ResultRow]:
    """One row per metric of a budget: ``values[metric] = (clean, worst case)``."""
    return [
        spec.row(task=task, metric=metric, attack=budget.attack, eps=budget.eps, steps=budget.steps,
                 clean=clean, adversarial=adversarial, n=n, seconds=budget.seconds, skipped=budget.skipped)
        for metric, (clean, adversarial) in values.items()
    ]


def fingerprint(model: VisionLanguageModel) -> str:
    """Identifies a model for resuming: its NLL of a fixed answer to a fixed ramp image."""
    size = model.image_size
    ramp = torch.linspace(0, 1, size * size, device=model.device).view(1, 1, size, size)
    probe = torch.cat([ramp, ramp.flip(-1), ramp.flip(-2)], dim=1)
    batch = model.collator().pairs(["What is in the image?"], ["a red circle."])
    with torch.no_grad():
        nll = model.per_sample_nll(probe, batch.to(model.device)).float().cpu()
    return hashlib.sha1(nll.numpy().round(4).tobytes()).hexdigest()[:16]
