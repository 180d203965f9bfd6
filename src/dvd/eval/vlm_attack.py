"""Attacking a vision-language model in an evaluation: the answer-NLL objective, the per-sample worst-case
ensemble of Schlarmann et al. / RobustVLM, and the resumable batched loop shared by the VLM commands.

The ensemble (``dvd eval caption`` / ``vqa`` / ``pope``): score every sample's clean output, then run APGD
on the NLL of each reference answer in turn (low precision on GPUs), then once more in fp32 against the
reference that did best, started from the most damaging image found so far, then optionally targeted
APGD towards fixed strings; after every attack the new outputs are generated and scored, and each sample
keeps the output with the *lowest* score. Only samples not yet broken (score above ``broken_at``) are
attacked again. Every output is stored, so the final per-sample minimum is taken again under the final
scorer and robust <= clean by construction.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from dvd.config import ConfigError, parse_eps_list, positive_int, suggest
from dvd.models.vlm_base import VisionLanguageModel
from dvd.models.vlm_conversation import VLMBatch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_EPS = "2/255,4/255"
BALL_TOLERANCE = 1e-6  # float32 rounding of (x + delta) - x
# score(batch positions, generated texts) -> one score per text; lower = more broken
Score = Callable[[Sequence[int], Sequence[str]], list[float]]


# ---------------------------------------------------------------------------------------- objective


def resolve_precision(precision: str | None, device: torch.device | str) -> str | None:
    """The autocast precision of an attack: None (fp32), "fp16" or "bf16"; "auto" = fp16 on CUDA only."""
    if precision is None or precision == "fp32":
        return None
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else None
    if precision not in DTYPES:
        raise ConfigError(f"unknown attack precision {precision!r}{suggest(precision, PRECISIONS)}")
    return precision


class AnswerNLL:
    """``fn(images, batch)`` for :func:`dvd.attacks.lm_nll`: the model's per-sample NLL of the answers in
    ``batch`` (a dict of :class:`VLMBatch` fields, so the attack can slice it), optionally under autocast.

    ``greedy_success``: also return, per sample, whether greedy decoding would now write the answer
    exactly (a targeted attack's success, so APGD stops attacking the samples it has won)."""

    def __init__(
        self, model: VisionLanguageModel, precision: str | None = None, *, greedy_success: bool = False
    ) -> None:
        self.__wrapped__ = model  # lets the attack find (and freeze) the model's parameters
        self.model = model
        self.dtype = None if precision is None else DTYPES[precision]
        self.greedy_success = greedy_success

    def __call__(self, images: Tensor, batch: dict[str, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        tokens = VLMBatch(**batch).to(images.device)
        if self.dtype is None:
            out = self.model(images, tokens, greedy=self.greedy_success)
        else:
            with torch.autocast(device_type=images.device.type, dtype=self.dtype):
                out = self.model(images, tokens, greedy=self.greedy_success)
        nll = out.per_sample_nll.float()
        return (nll, out.answer_is_greedy) if self.greedy_success else nll


def answer_objective(
    model: VisionLanguageModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    targeted: bool = False,
    precision: str | None = None,
) -> Any:
    """The NLL of ``answers`` given the images and ``prompts``: maximised, or minimised when ``targeted``."""
    from dvd.attacks import lm_nll

    batch = model.collator().pairs(list(prompts), list(answers))
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return lm_nll(AnswerNLL(model, precision, greedy_success=targeted), batch=fields, targeted=targeted)


def check_in_ball(adversarial: Tensor, images: Tensor, eps: float) -> None:
    """Refuse images outside the L-inf ball of radius ``eps`` around ``images``, or outside [0, 1]."""
    distance = float((adversarial - images).abs().amax()) if images.numel() else 0.0
    low, high = (float(v) for v in torch.aminmax(adversarial)) if adversarial.numel() else (0.0, 1.0)
    if distance > eps + BALL_TOLERANCE or low < 0 or high > 1:
        raise RuntimeError(
            f"attack left the threat model: L-inf distance {distance:.6g} (eps {eps:.6g}), "
            f"pixel range [{low:.4g}, {high:.4g}]; this is a bug in the attack"
        )


def attack_answers(
    model: VisionLanguageModel,
    images: Tensor,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    eps: float,
    steps: int,
    generator: torch.Generator,
    targeted: bool = False,
    precision: str | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """APGD (L-inf) on the images against the NLL of ``answers``, from ``start`` or a random point;
    the result is checked to lie in the ball."""
    from dvd.attacks import apgd

    objective = answer_objective(model, prompts, answers, targeted=targeted, precision=precision)
    adversarial = apgd(objective, images, eps=eps, steps=steps, generator=generator, x_init=start).detach()
    check_in_ball(adversarial, images, eps)
    return adversarial


# ---------------------------------------------------------------------------------------- the ensemble


@dataclass(frozen=True)
class Stage:
    """One attack of the ensemble: APGD on the NLL of a sample's ``reference`` (an index into its
    references, cycled), of the reference that did best so far (``best``), or towards ``target``."""

    name: str
    reference: int = 0
    best: bool = False
    target: str | None = None
    precision: str | None = None


def ensemble_stages(
    n_references: int, *, precision: str | None, targets: Sequence[str] = (), final: bool = True
) -> list[Stage]:
    """The paper's ensemble: one APGD per reference in ``precision``, one fp32 APGD on the best reference,
    then targeted APGD (fp32) towards each of ``targets`` (VQA: "maybe", "Word")."""
    tag = precision or "fp32"
    stages = [Stage(f"ref{i}-{tag}", reference=i, precision=precision) for i in range(n_references)]
    if final:
        stages.append(Stage("best-fp32", best=True))
    return stages + [Stage(f"target-{t}", target=t) for t in targets]


class WorstCase:
    """Per sample: every output seen (clean first), the lowest score, its image and its reference index."""

    def __init__(self, images: Tensor, outputs: Sequence[str], scores: Sequence[float]) -> None:
        if not len(outputs) == len(scores) == images.shape[0]:
            raise ValueError(f"{images.shape[0]} images, {len(outputs)} outputs, {len(scores)} scores")
        self.images = images.detach().clone()
        self.outputs = [[text] for text in outputs]
        self.scores = [float(s) for s in scores]
        self.best_reference = [0] * len(outputs)
        self.sources = [["clean"] for _ in outputs]  # the stage behind each output
        self.worst = [0] * len(outputs)  # the index of each sample's lowest-scoring output

    def alive(self, broken_at: float) -> list[int]:
        """Samples not yet broken: score above ``broken_at``."""
        return [i for i, score in enumerate(self.scores) if score > broken_at]

    def update(
        self,
        index: Sequence[int],
        images: Tensor,
        outputs: Sequence[str],
        scores: Sequence[float],
        references: Sequence[int | None],
        source: str = "attack",
    ) -> None:
        """Record the outputs of an attack on the samples ``index``; keep each one's lowest score."""
        for j, i in enumerate(index):
            self.outputs[i].append(outputs[j])
            self.sources[i].append(source)
            if scores[j] < self.scores[i]:
                self.scores[i] = float(scores[j])
                self.worst[i] = len(self.outputs[i]) - 1
                self.images[i] = images[j]
                if references[j] is not None:
                    self.best_reference[i] = int(references[j])


def worst_case_attack(
    model: VisionLanguageModel,
    images: Tensor,
    prompts: Sequence[str],
    references: Sequence[Sequence[str]],
    score: Score,
    *,
    eps: float,
    steps: int,
    stages: Sequence[Stage],
    broken_at: float,
    generator: torch.Generator,
    max_new_tokens: int,
) -> WorstCase:
    """Run ``stages`` on the samples still above ``broken_at`` (see the module docstring)."""
    outputs = model.generate(images, list(prompts), max_new_tokens=max_new_tokens)
    result = WorstCase(images, outputs, score(range(len(outputs)), outputs))
    for stage in stages:
        index = result.alive(broken_at)
        if not index:
            break
        chosen: list[int | None] = []
        answers = []
        for i in index:
            if stage.target is not None:
                chosen.append(None)
                answers.append(stage.target)
            else:
                k = (result.best_reference[i] if stage.best else stage.reference) % len(references[i])
                chosen.append(k)
                answers.append(references[i][k])
        sub_prompts = [prompts[i] for i in index]
        adversarial = attack_answers(
            model,
            images[index],
            sub_prompts,
            answers,
            eps=eps,
            steps=steps,
            generator=generator,
            targeted=stage.target is not None,
            precision=stage.precision,
            start=result.images[index] if stage.best else None,  # the paper: fp32 APGD from the best so far
        )
        texts = model.generate(adversarial, sub_prompts, max_new_tokens=max_new_tokens)
        result.update(index, adversarial, texts, score(index, texts), chosen, source=stage.name)
    return result


# ---------------------------------------------------------------------------------------- batches


def run_batches(
    dataset: Any,
    evaluate_batch: Callable[[list[int], list[dict[str, Any]]], list[dict[str, Any]]],
    *,
    key: dict[str, Any],
    state_file: Path | None,
    batch_size: int,
    limit: int | None,
    label: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a map-style dataset of dict items in order, ``batch_size`` at a time.

    ``evaluate_batch(positions, items)`` returns one JSON-able record per item; records accumulate in
    ``state["samples"]``, saved atomically to ``state_file`` after every batch, so a rerun with the same
    ``key`` continues where an interrupted one stopped. Unreadable samples (None) are skipped and counted.
    """
    from dvd.eval.results import load_state, save_state

    state = load_state(state_file, key)
    state.setdefault("samples", [])
    end = len(dataset) if limit is None else min(limit, len(dataset))
    bar = tqdm(
        total=end, initial=state["position"], desc=label, unit="sample", disable=not progress, file=sys.stderr
    )
    while not state["finished"] and state["position"] < end:
        tick = time.perf_counter()
        start = state["position"]
        stop = min(start + batch_size, end)
        read = [(i, dataset[i]) for i in range(start, stop)]
        items = [(i, item) for i, item in read if item is not None]
        if items:
            state["samples"] += evaluate_batch([i for i, _ in items], [item for _, item in items])
        state["skipped"] += stop - start - len(items)
        state["position"] = stop
        state["seconds"] += time.perf_counter() - tick
        save_state(state_file, state)
        bar.update(stop - start)
    state["finished"] = True
    save_state(state_file, state)
    bar.close()
    if not state["samples"]:
        raise ValueError(f"{label}: no readable samples; check the image directory")
    return state


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
        from dvd.eval.samples import output_records

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
    task_name: str,
    eps_list: Sequence[float],
    attack: str,
    stages: Sequence[Stage],
    steps: int,
    broken_at: float,
    max_new_tokens: int,
    batch_size: int,
    limit: int | None,
    seed: int,
    model_name: str,
    dataset_name: str,
    state_dir: str | Path | None,
    progress: bool,
    settings: dict[str, Any],
    save_samples: str | Path | None = None,
) -> list[BudgetResult]:
    """Greedy outputs for every item of ``data``, clean and under the worst-case ensemble, per budget.

    ``eps == 0`` (or no ``stages``) gives the clean outputs only. ``settings`` (everything else the outputs
    depend on) goes into the resume key; the model is in eval mode with frozen parameters meanwhile.
    ``save_samples``: a directory for per-sample records and worst-case images (:mod:`dvd.eval.samples`).
    """
    from dvd.eval.results import eps_text, state_path
    from dvd.eval.samples import writer_for
    from dvd.eval.zeroshot import evaluation_mode

    results = []
    with evaluation_mode(model):
        key = {
            "task": task_name,
            "model_name": model_name,
            "dataset_name": dataset_name,
            "attack": attack,
            "stages": [dataclasses.asdict(s) for s in stages],
            "steps": steps,
            "broken_at": broken_at,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "limit": limit,
            "seed": seed,
            "fingerprint": fingerprint(model),
            **settings,
        }
        for eps in eps_list:
            attacked = eps > 0 and bool(stages)
            name, budget_steps = (attack, steps) if attacked else ("none", 0)
            evaluate_batch = functools.partial(
                batch_outputs,
                model,
                task,
                eps=eps,
                stages=stages if attacked else [],
                steps=steps,
                broken_at=broken_at,
                seed=seed,
                max_new_tokens=max_new_tokens,
                writer=writer_for(save_samples, task=task_name, model=model_name, dataset=dataset_name,
                                  attack=name, eps=eps),
            )
            state_file = None
            if state_dir is not None:
                state_file = state_path(
                    state_dir,
                    task=task_name,
                    model=model_name,
                    dataset=dataset_name,
                    attack=name,
                    steps=budget_steps,
                    eps=eps,
                )
            state = run_batches(
                data,
                evaluate_batch,
                key={**key, "eps": eps},
                state_file=state_file,
                batch_size=batch_size,
                limit=limit,
                progress=progress,
                label=f"{dataset_name} {name} eps={eps_text(eps)}",
            )
            results.append(
                BudgetResult(eps, name, budget_steps, state["samples"], state["seconds"], state["skipped"])
            )
    return results


def fingerprint(model: VisionLanguageModel) -> str:
    """Identifies a model for resuming: its NLL of a fixed answer to a fixed ramp image."""
    size = model.image_size
    ramp = torch.linspace(0, 1, size * size, device=model.device).view(1, 1, size, size)
    probe = torch.cat([ramp, ramp.flip(-1), ramp.flip(-2)], dim=1)
    batch = model.collator().pairs(["What is in the image?"], ["a red circle."])
    with torch.no_grad():
        nll = model.per_sample_nll(probe, batch.to(model.device)).float().cpu()
    return hashlib.sha1(nll.numpy().round(4).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- command line


def add_common_arguments(parser: argparse.ArgumentParser, *, attacks: Sequence[str], attack: str) -> None:
    """The options every VLM evaluation takes (model, budgets, attack, batching, output)."""
    parser.add_argument("--model", required=True, help="dvd VLM checkpoint dir, or HF LLaVA name / local dir")
    parser.add_argument("--model-base", default=None, help="base LM of a LoRA / projector-only LLaVA release")
    parser.add_argument("--model-name", default=None, help="short name for the result rows")
    parser.add_argument("--dataset-name", default=None, help="dataset name for the result rows")
    parser.add_argument("--eps", default=DEFAULT_EPS, help=f"comma-separated L-inf budgets ({DEFAULT_EPS})")
    parser.add_argument("--eps-unit", default=None, help="divide --eps by this, e.g. 255")
    parser.add_argument("--attack", default=attack, help=f"{', '.join(attacks)} (default {attack})")
    parser.add_argument("--steps", default="100", help="APGD iterations per attack run")
    parser.add_argument(
        "--attack-precision",
        default="auto",
        help="autocast precision of the APGD runs: fp16, bf16, fp32 or auto (fp16 on CUDA, fp32 on CPU); "
        "the ensemble's final and targeted runs are always fp32",
    )
    parser.add_argument("--batch-size", default="8", help="images per attack call")
    parser.add_argument("--limit", default=None, help="evaluate the first N samples")
    parser.add_argument("--max-new-tokens", default=None, help="greedy decoding length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default="fp32", choices=sorted(DTYPES), help="model weights (fp32 keeps fp32 attacks fp32)"
    )
    parser.add_argument("--out", default="results.json", help="result rows JSON (merged into if it exists)")
    parser.add_argument(
        "--save-samples", default=None, help="directory for per-sample JSONL records + worst-case images"
    )
    parser.add_argument("--no-progress", action="store_true")


@dataclass
class CommonOptions:
    """The parsed and checked common options."""

    eps_list: list[float]
    attack: str
    steps: int
    precision: str
    batch_size: int
    limit: int | None
    max_new_tokens: int | None
    out: Path
    checkpoint: str = ""  # what --model is, as recorded in the rows (dvd.eval.options.model_checkpoint)
    save_samples: Path | None = None


def parse_common(args: argparse.Namespace, attacks: Sequence[str]) -> CommonOptions:
    """Check the common options, with one-line errors, and claim the results file (before any work)."""
    from dvd.eval import options
    from dvd.eval.output import claim_output
    from dvd.eval.results import check_model_name

    if args.attack not in attacks:
        raise ConfigError(f"unknown attack {args.attack!r}{suggest(args.attack, attacks)}")
    if args.attack_precision not in PRECISIONS:
        raise ConfigError(
            f"unknown attack precision {args.attack_precision!r}{suggest(args.attack_precision, PRECISIONS)}"
        )
    eps_list = parse_eps_list(args.eps, options.eps_unit(args.eps_unit))
    if args.attack == "none":
        eps_list = [0.0]
    options.check_model_argument(args.model, kind="VLM")
    out = claim_output(args.out)
    checkpoint = options.model_checkpoint(args.model)
    check_model_name(out, model_name_of(args), checkpoint)
    return CommonOptions(
        eps_list=sorted(set(eps_list)),
        attack=args.attack,
        steps=positive_int(args.steps, "--steps"),
        precision=args.attack_precision,
        batch_size=positive_int(args.batch_size, "--batch-size"),
        limit=None if args.limit is None else positive_int(args.limit, "--limit"),
        max_new_tokens=None
        if args.max_new_tokens is None
        else positive_int(args.max_new_tokens, "--max-new-tokens"),
        out=out,
        checkpoint=checkpoint,
        save_samples=None if getattr(args, "save_samples", None) is None else Path(args.save_samples),
    )


def broken_at(value: float) -> float:
    """A ``--broken-at`` threshold: any number but NaN (-inf: never counted as broken)."""
    if value != value:
        raise ConfigError("--broken-at must be a number (e.g. 0.1, or -inf to attack every sample)")
    return value


def load_model(
    spec: str, *, device: str, dtype: str = "fp32", model_base: str | None = None
) -> VisionLanguageModel:
    """A dvd checkpoint directory (``dvd_vlm.json``) via ``load_vlm``, a LLaVA in its authors' layout
    (on ``model_base`` for LoRA / projector-only releases), else an HF LLaVA name or directory."""
    from dvd.eval.options import check_model_argument

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(
            f"--device {device!r} is not a torch device; use e.g. cpu, cuda or cuda:1"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but no CUDA device is available; use --device cpu")
    path = Path(spec)
    torch_dtype = None if dtype == "fp32" else DTYPES[dtype]
    check_model_argument(spec, kind="VLM")
    from dvd.models.llava_original import is_llava_original, load_llava_original

    if model_base is not None and not is_llava_original(spec):
        raise ConfigError(f"--model-base applies to LoRA / projector-only LLaVA releases, not {spec}")
    if (path / "dvd_vlm.json").is_file():
        from dvd.models.vlm_io import load_vlm

        return load_vlm(path, device=device, dtype=torch_dtype)
    if is_llava_original(spec):
        return load_llava_original(spec, model_base=model_base, device=device, dtype=torch_dtype)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{spec} is neither a dvd VLM checkpoint (no dvd_vlm.json) "
            "nor an HF LLaVA directory (no config.json)"
        )
    if not path.exists() and spec.count("/") != 1:
        raise FileNotFoundError(f"{spec}: no such checkpoint directory, and not an HF name like org/model")
    from dvd.models.vlm_hf import load_hf_llava

    return load_hf_llava(spec, device=device, dtype=torch_dtype)


def model_name_of(args: argparse.Namespace) -> str:
    """The rows' ``model``: ``--model-name``, else the checkpoint's own name (never a folder like final)."""
    from dvd.eval.options import model_row_name

    return args.model_name or model_row_name(args.model)


def finish(rows: list[Any], out: Path, state_dir: Path, checkpoint: str = "") -> int:
    """Merge ``rows`` (of the model loaded from ``checkpoint``) into ``out``, drop their states, print."""
    from dvd.eval.options import mark_rows
    from dvd.eval.results import flag_rising_robustness, format_table, remove_states, write_rows

    groups: dict[tuple[str, str, str], list[Any]] = {}
    for row in rows:  # robustness must not rise with eps; targeted success and the yes-ratio may
        if row.task != "targeted" and row.metric != "yes_ratio":
            groups.setdefault((row.dataset, row.metric, row.attack), []).append(row)
    for group in groups.values():
        flag_rising_robustness(group)
    write_rows(out, mark_rows(rows, checkpoint))
    remove_states(state_dir, rows)
    print(format_table(rows))
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    return 0
