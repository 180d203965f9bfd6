"""Zero-shot classification accuracy of a CLIP, clean and under attack, per budget (the paper's first table).

The evaluation goes batch by batch and saves its per-sample results after every batch: an interrupted run,
rerun, continues where it stopped and ends with the same numbers.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dvd import attacks as attack_library
from dvd.attacks.escalation import ESCALATION_QUERIES
from dvd.attacks.robustness import CHECK_QUERIES
from dvd.config import ConfigError
from dvd.eval.batching import evaluation_mode, stream_batches, total_samples
from dvd.eval.results import ResultRow, eps_text, flag_rising_robustness, load_state, save_state, state_path
from dvd.eval.samples import classification_records, writer_for
from dvd.eval.spec import EvalSpec, clip_defaults
from dvd.eval.zeroshot_carry import Carry, Outcome, merge
from dvd.eval.zeroshot_classifier import (
    ZeroShotClassifier,
    ZeroShotData,
    classifier_fingerprint,
    resolve_attacks,
)


def evaluate_zeroshot(
    model: nn.Module,
    data: ZeroShotData,
    spec: EvalSpec | None = None,
    *,
    check: bool = True,
    text_batch_size: int = 256,
    workers: int = 0,
    eot: int | None = None,
    carry_over: bool = True,
    escalation_queries: int = ESCALATION_QUERIES,
    check_queries: int = CHECK_QUERIES,
    **settings: Any,
) -> list[ResultRow]:
    """Clean and robust zero-shot accuracy on ``data`` for every budget in ``spec.eps_list``.

    ``spec`` (or its fields as keywords, e.g. ``eps_list=[4 / 255]``) holds the common settings; the attack
    defaults to ``apgd-ce``, the batch to 64 images. One row per eps (``attack="none"``: one clean row at
    eps 0). The attack runs in fp32 unless ``spec.precision`` is "bf16"/"fp16" (the paper evaluates without
    AMP; successes are re-checked in fp32). ``check=False`` skips the gradient-masking checks (rows then
    carry ``masking_checks_skipped``). With ``spec.state_dir``, the per-sample results are saved after every
    batch and a rerun resumes. ``eot`` averages the attacks' gradients over that many draws (None: only for
    a randomised model). ``spec.save_samples``: a directory for per-sample records and adversarial images
    (:mod:`dvd.eval.samples`). Budgets are evaluated in ascending order; with ``carry_over`` a sample not
    robust at a smaller eps is not attacked again at a larger one (:mod:`dvd.eval.zeroshot_carry`).
    ``escalation_queries``: the Square Attack's budget when a gradient-masking check fires (AutoAttack
    standard's 5000 unless told; the rows' ``escalated`` flag states the budget used). ``check_queries``:
    the gradient-free check's Square queries on the samples APGD left standing (200 unless told; any
    sample it breaks counts as broken and fires the escalation).
    """
    spec = EvalSpec.of(spec, settings, **clip_defaults(model, data), attack="apgd-ce")
    attacks = resolve_attacks(spec.attack)
    budgets = [0.0] if spec.attack == "none" else sorted({float(e) for e in spec.eps_list})
    if not budgets:
        raise ConfigError("empty eps list; give at least one budget, e.g. --eps 4/255")
    if len(data.classnames) <= 2 and {"apgd-t", "fab-t"} & set(attacks):
        # a targeted attack has no other class to aim at (paper: APGD-CE only)
        attacks = tuple(a for a in attacks if a not in ("apgd-t", "fab-t")) or ("apgd-ce",)
    with evaluation_mode(model):
        classifier = ZeroShotClassifier(
            model, data.classnames, data.templates, text_batch_size=text_batch_size
        )
        fingerprint = classifier_fingerprint(classifier)
        rows = []
        carry, carried_from = None, None
        for eps in budgets:
            run = _Budget(
                classifier=classifier,
                data=data,
                spec=spec,
                eps=eps,
                attack=spec.attack if eps > 0 else "none",
                attacks=attacks if eps > 0 else (),
                steps=spec.steps if eps > 0 else 0,
                workers=workers,
                check=check,
                fingerprint=fingerprint,
                eot=eot,
                escalation_queries=escalation_queries,
                check_queries=check_queries,
                carry=carry if carry_over and eps > 0 else None,
                carried_from=carried_from if carry_over and eps > 0 else None,
            )
            rows.append(run.evaluate(spec.state_dir))
            if eps > 0:
                carry, carried_from = run.next_carry, eps
    flag_rising_robustness(rows)
    return rows


@dataclass
class _Budget:
    """The evaluation of one (dataset, eps): batches, per-sample results, resumable state."""

    classifier: ZeroShotClassifier
    data: ZeroShotData
    spec: EvalSpec
    eps: float
    attack: str
    attacks: tuple[str, ...]
    steps: int
    check: bool
    workers: int
    fingerprint: str
    eot: int | None = None
    escalation_queries: int = ESCALATION_QUERIES
    check_queries: int = CHECK_QUERIES
    carry: Carry | None = None  # the samples of the next smaller budget (None: attack every sample)
    carried_from: float | None = None
    next_carry: Carry = field(default_factory=Carry)  # this budget's samples, for the next larger one

    def _save(self, start: int, labels: torch.Tensor, clean: torch.Tensor, adversarial: Any = None,
              attack_of: Any = None, loss: Any = None, images: torch.Tensor | None = None) -> None:
        """Per-sample records (and adversarial images) for ``--save-samples``."""
        writer = writer_for(self.spec.save_samples, task="zeroshot", model=self.spec.model_name,
                            dataset=self.spec.dataset_name, attack=self.attack, eps=self.eps)
        if writer is not None:
            names = self.classifier.classnames
            writer.write(classification_records(start, labels, clean, adversarial, attack_of, loss, names),
                         images)

    def _save_outcome(self, start: int, labels: torch.Tensor, outcome: Outcome) -> None:
        if self.spec.save_samples is not None:
            self._save(start, labels, outcome.predicted, outcome.attacked, outcome.broken_by, outcome.loss,
                       outcome.adversarial)

    @property
    def key(self) -> dict[str, Any]:
        """Everything the per-sample results depend on; a saved state with another key is not resumed."""
        spec = self.spec
        return {
            "model_name": spec.model_name,
            "dataset_name": spec.dataset_name,
            "attack": self.attack,
            "attacks": self.attacks,
            "eps": self.eps,
            "steps": self.steps,
            "seed": spec.seed,
            "batch_size": spec.batch_size,
            "limit": spec.limit,
            "attack_precision": spec.precision,
            "check": self.check,
            "fingerprint": self.fingerprint,
            "eot": self.eot,
            **self._escalation_key(),
            "carried_from": self.carried_from,
        }

    def _escalation_key(self) -> dict[str, int]:
        """The Square budgets, only when not the defaults: states saved before the options still resume."""
        key = {}
        if self.escalation_queries != ESCALATION_QUERIES:
            key["escalation_queries"] = self.escalation_queries
        if self.check_queries != CHECK_QUERIES:
            key["check_queries"] = self.check_queries
        return key

    def state_path(self, state_dir: str | Path | None) -> Path | None:
        if state_dir is None:
            return None
        return state_path(
            state_dir,
            task="zeroshot",
            model=self.spec.model_name,
            dataset=self.spec.dataset_name,
            attack=self.attack,
            steps=self.steps,
            eps=self.eps,
        )

    def evaluate(self, state_dir: str | Path | None) -> ResultRow:
        path = self.state_path(state_dir)
        state = load_state(path, self.key)
        clean: list[bool] = state["clean"]
        robust: list[bool] = state["robust"]
        state.setdefault("labels", [])
        state.setdefault("broken_by", [])
        flags: set[str] = set(state["flags"])
        if not self.check and self.eps > 0:
            flags.add("masking_checks_skipped")
        total = total_samples(self.data.dataset, self.spec.limit)
        label = f"{self.spec.dataset_name} {self.attack} eps={eps_text(self.eps)}"
        bar = tqdm(
            total=total,
            initial=state["position"],
            desc=label,
            unit="img",
            disable=not self.spec.progress,
            file=sys.stderr,
        )
        device = self.classifier.weights.device
        if not state["finished"]:
            if hasattr(self.data.dataset, "yield_skipped"):
                # a shard stream yields its corrupt samples as None: counted here, whichever process read them
                self.data.dataset.yield_skipped = True
            batches = stream_batches(
                self.data.dataset,
                self.spec.batch_size,
                start=state["position"],
                limit=self.spec.limit,
                workers=self.workers,
            )
            for position, next_position, images, labels in batches:
                tick = time.perf_counter()
                if len(labels):
                    images, labels = images.to(device), labels.to(device)
                    index = list(range(len(clean), len(clean) + len(labels)))
                    outcome = self._evaluate_batch(images, labels, position, index)
                    clean += outcome.clean.tolist()
                    robust += outcome.robust.tolist() if self.eps > 0 else []
                    flags.update(outcome.flags)
                    state["labels"] += labels.tolist()
                    state["broken_by"] += outcome.broken_by
                state.update(clean=clean, robust=robust, flags=sorted(flags), position=next_position)
                state["skipped"] += next_position - position - len(labels)
                state["seconds"] += time.perf_counter() - tick
                save_state(path, state)
                bar.update(next_position - position)
                bar.set_postfix(clean=f"{_mean(clean):.3f}", robust=f"{_mean(robust):.3f}" if robust else "-")
            state["finished"] = True
            save_state(path, state)
        bar.close()
        if self.eps > 0 and len(self.next_carry.robust) != len(robust):  # resumed: carry what the state has
            records = self.next_carry.records
            self.next_carry = Carry(state["labels"], clean, robust, state["broken_by"], records)
        if not clean:
            name = self.spec.dataset_name
            raise ValueError(f"{name} yielded no samples; check the dataset directory and split")
        return self.spec.row(
            task="zeroshot",
            metric="accuracy",
            attack=self.attack,
            eps=self.eps,
            steps=self.steps,
            clean=_mean(clean),
            adversarial=_mean(robust),
            n=len(clean),
            seconds=state["seconds"],
            skipped=state["skipped"],
            flags=flags,
        )

    def _evaluate_batch(
        self, images: torch.Tensor, labels: torch.Tensor, start: int, index: list[int]
    ) -> Outcome:
        """The batch's outcome; ``index`` numbers its samples in evaluation order (for the carry-over)."""
        if self.eps == 0:
            autocast = (
                torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext()
            )
            with torch.no_grad(), autocast:
                predicted = self.classifier(images).argmax(dim=1)
            self._save(start, labels, predicted)
            return Outcome((predicted == labels).cpu(), torch.empty(0), set(), [None] * len(labels))
        need_records = self.spec.save_samples is not None
        keep = [False] * len(labels)
        if self.carry is not None:
            keep = self.carry.carried(index, labels, need_records=need_records)
        todo = [j for j, k in enumerate(keep) if not k]
        attacked = None
        if todo:
            seed = self.spec.seed + start  # per-batch seed from the sample offset: a resumed run draws alike
            attack = self._pgd if self.attack == "pgd" else self._robustness
            attacked = attack(images[todo], labels[todo], seed)
        outcome = attacked if attacked is not None and not any(keep) else merge(
            self.carry or Carry(), index, keep, attacked, images.device
        )
        self._save_outcome(start, labels, outcome)
        self.next_carry.remember(index, labels, outcome)
        return outcome

    def _robustness(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> Outcome:
        """dvd's attack ensemble (AutoAttack's protocol) on the batch."""
        result = attack_library.evaluate_robustness(
            self.classifier,
            images,
            labels,
            eps=self.eps,
            norm="linf",
            attacks=self.attacks,
            steps=self.steps,
            seed=seed,
            precision=self.spec.precision,
            check=self.check,
            eot=self.eot,
            escalation_queries=self.escalation_queries,
            check_queries=self.check_queries,
        )  # scores: 0/1 per sample, or the fraction over fresh draws for a randomised model
        outcome = Outcome(
            result.clean_score.cpu(),
            result.robust_score.cpu(),
            set(_flag_names(result.flags)),
            list(result.attack_of) or [None] * len(labels),
        )
        if self.spec.save_samples is not None:
            with torch.no_grad():
                clean, attacked = (self.classifier(x).argmax(dim=1) for x in (images, result.adversarial))
            outcome.predicted, outcome.attacked = clean, attacked
            outcome.loss, outcome.adversarial = result.loss, result.adversarial
        return outcome

    def _pgd(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> Outcome:
        """Plain L-inf PGD on the cross-entropy (step 2.5 eps / steps) of the clean-correct samples."""
        with torch.no_grad():
            clean = self.classifier(images).argmax(dim=1) == labels
        robust = clean.clone()
        index = clean.nonzero()[:, 0]
        adversarial = images.clone()
        loss = torch.full((len(labels),), float("nan"), device=images.device)
        if index.numel():
            forward = attack_library.low_precision(self.classifier, self.spec.precision)
            generator = torch.Generator(device=images.device).manual_seed(seed)
            found = attack_library.pgd_attack(
                attack_library.cross_entropy(forward, labels[index]),
                images[index],
                eps=self.eps,
                steps=self.steps,
                generator=generator,
            )
            with torch.no_grad():  # judged in fp32 whatever precision the attack ran in
                robust[index] = self.classifier(found.adversarial).argmax(dim=1) == labels[index]
            adversarial[index], loss[index] = found.adversarial, found.loss.float()
        attack_of = ["pgd" if b else None for b in (clean & ~robust).tolist()]
        # the checks belong to the ensemble
        outcome = Outcome(clean.cpu(), robust.cpu(), {"masking_checks_skipped"}, attack_of)
        if self.spec.save_samples is not None:
            with torch.no_grad():
                before, after = (self.classifier(x).argmax(dim=1) for x in (images, adversarial))
            outcome.predicted, outcome.attacked = before, after
            outcome.loss, outcome.adversarial = loss, adversarial
        return outcome


def _flag_names(flags: Any) -> list[str]:
    """The fired checks as names, whatever container the attack reports them in."""
    if not flags:
        return []
    if isinstance(flags, str):
        return [flags]
    if isinstance(flags, dict):
        return [str(k) for k, v in flags.items() if v]
    return [str(f) for f in flags]


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else 0.0
