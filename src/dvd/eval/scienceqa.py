"""ScienceQA (LLaVA's format and prompt): multiple-choice accuracy overall and on the image questions,
clean and under attack.

The prompt is LLaVA-1.5's ``model_vqa_science --single-pred-prompt``: ``<image>\\n`` + the question (context,
question, lettered options) + ``\\nAnswer with the option's letter from the given choices directly.``;
answers are read as LLaVA's ``eval_science_qa.py`` reads them. The attack (``--attack apgd``) is untargeted
APGD on the NLL of the correct letter, only on questions answered right; a question counts as wrong under
attack if any attacked answer is wrong. Text-only questions (no image) are answered from the text alone
(as LLaVA does) and are the same under attack: the overall robust accuracy includes them unchanged.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dvd.config import ConfigError
from dvd.data.scienceqa import is_correct, scienceqa_split
from dvd.eval import vlm_attack as va
from dvd.eval import vlm_protocols as vp
from dvd.eval.batching import evaluation_mode
from dvd.eval.results import ResultRow
from dvd.eval.spec import VLM_DEFAULTS, EvalSpec
from dvd.models.llava_preprocess import model_transform
from dvd.models.vlm_base import VisionLanguageModel

__all__ = ["SCIENCEQA_PROMPT", "evaluate_scienceqa", "text_only_answers"]

SCIENCEQA_PROMPT = "Answer with the option's letter from the given choices directly."
SCIENCEQA_ATTACKS = ("none", "apgd")
QUESTIONS_FILE = "llava_test_CQM-A.json"


@dataclass
class _ScienceQA:
    """The task for :func:`dvd.eval.vlm_attack.evaluate_outputs`: attack the NLL of the correct letter."""

    instruction: str

    def prompt(self, item: dict[str, Any]) -> str:
        return f"{item['question']}\n{self.instruction}"

    def references(self, position: int, item: dict[str, Any]) -> list[str]:
        return [item["answer"]]

    def score(self, position: int, item: dict[str, Any], text: str) -> float:
        return float(is_correct(text, item["answer"], item["n_choices"]))

    def record(self, position: int, item: dict[str, Any]) -> dict[str, Any]:
        return {"id": item["id"], "answer": item["answer"], "n_choices": item["n_choices"]}


@torch.no_grad()
def text_only_answers(
    model: VisionLanguageModel, prompts: Sequence[str], *, max_new_tokens: int
) -> list[str]:
    """Greedy answers to prompts without an image: the model's template around the text, no image tokens."""
    tokenizer, template = model.tokenizer, model.template
    lm = model.causal_lm()
    eos = tokenizer.eos_token_id
    pad = model.collator().pad_token_id
    answers = []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        for text, _ in template.segments([(prompt, None)]):
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([ids], device=model.device)
        out = lm.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip())
    return answers


def evaluate_scienceqa(
    model: VisionLanguageModel,
    image_questions: Any,
    text_questions: Sequence[dict[str, Any]],
    spec: EvalSpec | None = None,
    *,
    instruction: str = SCIENCEQA_PROMPT,
    **settings: Any,
) -> list[ResultRow]:
    """Rows ``accuracy`` (all questions) and ``image_accuracy`` (those with an image) per budget.

    ``image_questions``: a :class:`dvd.data.scienceqa.ScienceQAImages` (or None); ``text_questions``: the
    text-only items. ``spec.limit`` caps each of the two groups; the attack (default none, ``spec.precision``
    default fp32) runs on the image questions.
    """
    defaults = {**VLM_DEFAULTS, "precision": "fp32"}
    spec = EvalSpec.of(spec, settings, **defaults, attack="none", dataset_name="scienceqa", max_new_tokens=16)
    if spec.attack not in SCIENCEQA_ATTACKS:
        raise ValueError(
            f"unknown ScienceQA attack {spec.attack!r}; choose from {', '.join(SCIENCEQA_ATTACKS)}"
        )
    task = _ScienceQA(instruction)
    texts = list(text_questions)[: spec.limit]
    with evaluation_mode(model):
        prompts = [task.prompt(q) for q in texts]
        answers = text_only_answers(model, prompts, max_new_tokens=spec.max_new_tokens)
    text_right = sum(task.score(0, q, a) for a, q in zip(answers, texts, strict=True))
    if image_questions is None:  # one clean row pair over the text questions
        budgets = [va.BudgetResult(0.0, "none", 0, [], 0.0)]
    else:
        budgets = va.answer_outputs(
            model, image_questions, task, spec=spec, task_name="scienceqa", stage="answer",
            settings={"instruction": instruction},
        )
    rows = []
    for budget in budgets:
        samples = budget.samples
        clean = sum(task.score(0, s, s["outputs"][0]) for s in samples)
        robust = sum(min(task.score(0, s, o) for o in s["outputs"]) for s in samples)
        total = len(samples) + len(texts)
        no_data = (0.0, 0.0)
        values = {
            "accuracy": ((clean + text_right) / total, (robust + text_right) / total) if total else no_data,
            "image_accuracy": (clean / len(samples), robust / len(samples)) if samples else no_data,
        }
        for metric, value in values.items():
            n = total if metric == "accuracy" else len(samples)
            rows += va.budget_rows(spec, budget, "scienceqa", {metric: value}, n)
    return rows


def cli(argv: Sequence[str]) -> int:
    """``dvd eval scienceqa``: ScienceQA accuracy (all, image subset), clean and optionally under APGD."""
    parser = argparse.ArgumentParser(prog="dvd eval scienceqa", description=cli.__doc__)
    va.add_vlm_arguments(parser, attacks=SCIENCEQA_ATTACKS, attack="none")
    parser.add_argument("--data", default=None, help="a ShapesWorld root (scienceqa/)")
    parser.add_argument("--questions", default=None, help=f"LLaVA's ScienceQA file, e.g. {QUESTIONS_FILE}")
    parser.add_argument("--images", default=None, help="its image folder (scienceqa/images/test)")
    parser.add_argument("--instruction", default=SCIENCEQA_PROMPT, help="appended on a new line")
    vp.add_protocol_arguments(parser)
    args = parser.parse_args(list(argv))
    protocol = vp.apply_protocol(parser, args, "scienceqa")
    common = va.parse_vlm(args, SCIENCEQA_ATTACKS)
    if args.data is not None:
        root = Path(args.data)  # ShapesWorld's JSON files name images relative to DIR/images
        questions, images = root / "scienceqa" / QUESTIONS_FILE, root / "images"
        name = "shapesworld/scienceqa"
    elif args.questions and args.images:
        questions, images, name = Path(args.questions), Path(args.images), "scienceqa"
    else:
        raise ConfigError("give --data SHAPESWORLD_ROOT, or --questions FILE and --images DIR")
    model = va.load_from_args(args)
    vp.use_template(model, args.template)
    image_questions, text_questions = scienceqa_split(questions, images, transform=model_transform(model))
    spec = common.spec.replace(dataset_name=args.dataset_name or name)
    rows = evaluate_scienceqa(model, image_questions, text_questions, spec, instruction=args.instruction)
    return va.finish(vp.stamp(rows, protocol, model), common.out, common.state_dir, common.checkpoint)
