"""What every evaluation takes, in one object, and the one constructor of its result rows.

An :class:`EvalSpec` holds the settings shared by ``dvd eval zeroshot / retrieval / caption / vqa / pope /
targeted / scienceqa / mme``: the rows' model and dataset names, the budgets, the attack and its steps and
precision, batching, the sample limit, the seed, where the resumable state and per-sample records go.
Task-specific settings (a prompt, the number of references) stay keyword arguments of each evaluator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dvd.eval.results import ResultRow
from dvd.io import versions

# what a VLM evaluation takes when neither the spec nor the evaluator says otherwise
VLM_DEFAULTS: dict[str, Any] = {"precision": "auto", "batch_size": 8, "model_name": "model"}


def clip_defaults(model: Any, data: Any) -> dict[str, Any]:
    """The CLIP evaluators' defaults: 64 images a batch, the model's and the dataset's names."""
    return {"batch_size": 64, "model_name": getattr(model, "model_name", "model"), "dataset_name": data.name}


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """The common settings of one evaluation run. ``None`` means "the evaluator's own default"
    (:meth:`with_defaults`): the attack, its precision, the dataset name and the decoding length differ
    between tasks."""

    eps_list: Sequence[float] = ()
    attack: str | None = None
    steps: int = 100
    precision: str | None = None  # autocast precision of the attack (see each evaluator)
    batch_size: int | None = None
    limit: int | None = None
    seed: int = 0
    model_name: str | None = None
    dataset_name: str | None = None
    max_new_tokens: int | None = None  # VLM decoding length
    state_dir: str | Path | None = None  # resumable per-batch state; None: not saved
    progress: bool = True
    save_samples: str | Path | None = None  # per-sample records + images (dvd.eval.samples)

    def with_defaults(self, **defaults: Any) -> EvalSpec:
        """This spec with every field that is None here taken from ``defaults``."""
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled) if filled else self

    def replace(self, **changes: Any) -> EvalSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, spec: EvalSpec | None, settings: dict[str, Any], **defaults: Any) -> EvalSpec:
        """An evaluator's spec: ``spec`` (or a default one) with ``settings`` (its fields given as keywords,
        e.g. ``eps_list=[4 / 255]``) applied, and the evaluator's ``defaults`` for what is still None."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown evaluation setting(s) {', '.join(unknown)}; EvalSpec has no such field")
        return dataclasses.replace(spec or cls(), **settings).with_defaults(**defaults)

    def row(
        self,
        *,
        task: str,
        metric: str,
        attack: str,
        eps: float,
        steps: int,
        clean: float,
        adversarial: float | None,
        n: int,
        seconds: float,
        dataset: str | None = None,
        skipped: int = 0,
        flags: Sequence[str] = (),
    ) -> ResultRow:
        """A result row of this run (``dataset``: the spec's unless given); no ``adversarial`` at eps 0."""
        return ResultRow(
            model=str(self.model_name),
            task=task,
            dataset=dataset if dataset is not None else str(self.dataset_name),
            metric=metric,
            attack=attack,
            eps=eps,
            steps=steps,
            clean=clean,
            adversarial=adversarial if eps > 0 else None,
            n=n,
            seconds=round(seconds, 3),
            seed=self.seed,
            flags=sorted(flags),
            versions=versions(),
            skipped=skipped,
        )
