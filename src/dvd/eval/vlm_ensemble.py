"""The per-sample worst-case ensemble of Schlarmann et al. / RobustVLM on a vision-language model.

Score every sample's clean output, then run APGD on the NLL of each reference answer in turn (low precision
on GPUs), then once more in fp32 against the reference that did best, started from the most damaging image
found so far, then optionally targeted APGD towards fixed strings; after every attack the new outputs are
generated and scored, and each sample keeps the output with the *lowest* score. Only samples not yet broken
(score above ``broken_at``) are attacked again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dvd.eval.vlm_objective import attack_answers
from dvd.models.vlm_base import VisionLanguageModel

# score(batch positions, generated texts) -> one score per text; lower = more broken
Score = Callable[[Sequence[int], Sequence[str]], list[float]]


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
