"""VQA metric: VQAv2 accuracy with the official answer normalisation.

An answer is normalised as the official VQA evaluation does: punctuation is deleted or turned into a
space, periods go unless a digit follows, the text is lowercased, number words become digits
("two" -> "2"), articles are dropped and apostrophe-less contractions get their apostrophe back
("dont" -> "don't"). Accuracy for one question is min(#matching annotators / 3, 1) averaged over the
10 leave-one-annotator-out subsets of the 10 human answers.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dvd.config import ConfigError, positive_int
from dvd.data.textvqa import TextVQA
from dvd.data.vqa import VQAv2
from dvd.eval import vlm_attack as va
from dvd.eval import vlm_protocols as vp
from dvd.eval.output import check_output_path
from dvd.eval.results import ResultRow, state_path
from dvd.eval.spec import VLM_DEFAULTS, EvalSpec
from dvd.io import write_json
from dvd.models.llava_preprocess import model_transform
from dvd.models.vlm_base import VisionLanguageModel

__all__ = ["evaluate_vqa", "normalize_answer", "ranked_answers", "vqa_accuracy", "vqa_predictions"]

# Punctuation handled by the official script; `'` (contractions), `:` and `.` (see below) are not in it.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_THOUSANDS = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # "yes." -> "yes", but "3.5" and ".5" keep theirs
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions typed without their apostrophe. Spellings that are English words of their own
# (its, lets, ill, id, well, were, wed, shed, shell, hell) are left alone.
_CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't"
        " haven't he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am"
        " mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've"
        " she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's"
        " someone'd someone'd've someone'll someone's something'd something'd've something'll"
        " that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas"
        " wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've"
        " who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've"
        " y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
    ).split()
}


def _process_punctuation(text: str) -> str:
    """The official punctuation step: delete or space out marks, drop periods not followed by a digit."""
    # Per mark, judged on the input: a mark that occurs next to a space (or any mark, when the input has a
    # digit-comma-digit number such as "1,000") is deleted; otherwise it separates words ("black/white").
    original, has_thousands = text, _THOUSANDS.search(text) is not None
    for mark in _PUNCTUATION:
        if mark in text:
            delete = has_thousands or f"{mark} " in original or f" {mark}" in original
            text = text.replace(mark, "" if delete else " ")
    return _PERIOD.sub("", text)


def _process_digits_articles(text: str) -> str:
    """The official word step: lowercase, number words to digits, drop articles, restore apostrophes."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """Normalise a VQA answer as the official evaluation does ("Two dogs." -> "2 dogs")."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, as_official_script: bool = False) -> float:
    """VQAv2 accuracy of one predicted answer against the human answers (normally 10).

    For each annotator left out in turn, the prediction scores min(#other annotators who gave it / 3, 1);
    the result is the mean over those subsets: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

    The prediction and the human answers are both normalised. The official script normalises the human
    answers less (only their punctuation, and only when they disagree), relying on VQAv2's stored answers
    being normalised already; ``as_official_script=True`` reproduces that exactly (on raw answers it then
    scores the prediction "two" against ten "two"s as 0, the prediction having become "2").
    """
    if isinstance(answers, str) or len(answers) < 2:
        raise ValueError(f"vqa_accuracy: needs a list of >= 2 human answers (VQAv2 has 10), got {answers!r}")
    predicted = normalize_answer(prediction)
    if as_official_script:
        stripped = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        references = [_process_punctuation(a) for a in stripped] if len(set(stripped)) > 1 else stripped
    else:
        references = [normalize_answer(a) for a in answers]
    matches = sum(r == predicted for r in references)
    # Leaving out a matching annotator leaves matches - 1; leaving out any other leaves matches.
    n = len(answers)
    return (matches * min((matches - 1) / 3, 1.0) + (n - matches) * min(matches / 3, 1.0)) / n


# ------------------------------------------------------------------------------ dvd eval vqa

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's VQA prompt suffix
VQA_ATTACKS = va.REFERENCE_ATTACKS
TARGETS = ("maybe", "Word")  # the paper's targeted answers for VQA


def ranked_answers(answers: Sequence[str]) -> list[str]:
    """The distinct human answers (equal once normalised), most frequent first, ties in order of
    appearance; each as first written. The attack references of a question."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for answer in answers:
        key = normalize_answer(answer)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, answer.strip())
    return [first[k] for k in sorted(counts, key=lambda k: -counts[k])]  # sorted() is stable


class _VQA(va.QuestionTask):
    """The VQA task for :func:`dvd.eval.vlm_attack.evaluate_outputs`."""

    def references(self, position: int, item: dict[str, Any]) -> list[str]:
        return ranked_answers(item["answers"])

    def score(self, position: int, item: dict[str, Any], text: str) -> float:
        return vqa_accuracy(text, item["answers"])

    def record(self, position: int, item: dict[str, Any]) -> dict[str, Any]:
        return {"question_id": item["question_id"], "answers": list(item["answers"])}


def answer_scores(outputs: Sequence[str], answers: Sequence[str]) -> tuple[float, float]:
    """VQA accuracy of the clean answer (``outputs[0]``) and the lowest over all of ``outputs``."""
    per_output = [vqa_accuracy(text, answers) for text in outputs]
    return per_output[0], min(per_output)


def evaluate_vqa(
    model: VisionLanguageModel,
    data: Any,
    spec: EvalSpec | None = None,
    *,
    n_references: int = 5,
    targets: Sequence[str] = TARGETS,
    broken_at: float = 0.0,
    suffix: str = SHORT_ANSWER,
    **settings: Any,
) -> list[ResultRow]:
    """VQAv2 accuracy of greedy answers, clean and under attack, one row per budget (eps 0: clean only).

    ``data`` is a :class:`dvd.data.vqa.VQAv2` with annotations. ``attack="ensemble"`` (default): APGD on
    the NLL of each of the ``n_references`` most frequent human answers (``spec.precision``), fp32 APGD on
    the best one, then targeted fp32 APGD towards each of ``targets``; each question keeps its
    lowest-accuracy answer and questions at accuracy <= ``broken_at`` are not attacked further. ``"apgd"``:
    one fp32 APGD on the most frequent answer.
    """
    spec = _spec(spec, settings, attack="ensemble")
    if spec.attack not in VQA_ATTACKS:
        raise ValueError(f"unknown VQA attack {spec.attack!r}; choose from {', '.join(VQA_ATTACKS)}")
    if any(len(r["fields"]["answers"]) < 2 for r in data.records[: spec.limit or len(data)]):
        raise ValueError(
            "VQA accuracy needs the human answers (>= 2 per question); pass the annotations file"
        )
    budgets = va.reference_outputs(
        model, data, _VQA(suffix), spec=spec, task_name="vqa", n_references=n_references, broken_at=broken_at,
        settings={"suffix": suffix}, targets=targets,
    )
    rows = []
    for budget in budgets:
        scores = [answer_scores(s["outputs"], s["answers"]) for s in budget.samples]
        clean, worst = sum(c for c, _ in scores) / len(scores), sum(w for _, w in scores) / len(scores)
        values = {"vqa_accuracy": (clean, worst)}
        rows += va.budget_rows(spec, budget, "vqa", values, len(scores))
    return rows


def vqa_predictions(
    model: VisionLanguageModel,
    data: Any,
    spec: EvalSpec | None = None,
    *,
    suffix: str = SHORT_ANSWER,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Clean greedy answers in VQAv2's submission format, ``[{"question_id": ..., "answer": ...}]``: what a
    test split without public answers (test-dev, test-std) is scored from, by its evaluation server."""
    spec = _spec(spec, settings, attack="none")
    (budget,) = va.evaluate_outputs(
        model,
        data,
        _VQA(suffix),
        spec=spec.replace(steps=0, save_samples=None),
        task_name="vqa-predictions",
        attack="none",
        stages=[],
        settings={"suffix": suffix},
    )
    return [{"question_id": s["question_id"], "answer": s["outputs"][0].strip()} for s in budget.samples]


def _spec(spec: EvalSpec | None, settings: dict[str, Any], *, attack: str) -> EvalSpec:
    return EvalSpec.of(spec, settings, **VLM_DEFAULTS, attack=attack, dataset_name="vqav2", max_new_tokens=10)


def cli(argv: Sequence[str]) -> int:
    """``dvd eval vqa``: VQAv2 accuracy of a VLM, clean and under attack."""
    parser = argparse.ArgumentParser(prog="dvd eval vqa", description=cli.__doc__)
    va.add_vlm_arguments(parser, attacks=VQA_ATTACKS, attack="ensemble")
    parser.add_argument("--data", default=None, help="a ShapesWorld root (vqa/, images/)")
    parser.add_argument("--questions", default=None, help="VQAv2 questions JSON")
    parser.add_argument(
        "--annotations", default=None, help="VQAv2 annotations JSON (the human answers); none for test-dev"
    )
    parser.add_argument("--images", default=None, help="image root")
    parser.add_argument(
        "--image-pattern",
        default=None,
        help="image file name from its id, e.g. 'COCO_test2015_{image_id:012d}.jpg' (default: found)",
    )
    parser.add_argument(
        "--predictions",
        default=None,
        help="write the clean answers here in VQAv2's submission format (a clean pass of its own; "
        "needed without --annotations)",
    )
    parser.add_argument("--references", default="5", help="most frequent answers attacked per question")
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help="targeted answers of the ensemble ('' for none)"
    )
    parser.add_argument("--broken-at", type=float, default=0.0, help="questions at this accuracy are done")
    parser.add_argument("--suffix", default=SHORT_ANSWER, help="appended to every question")
    parser.add_argument("--textvqa", default=None, help="TextVQA's JSON (TextVQA_0.5.1_val.json) + --images")
    vp.add_protocol_arguments(parser)
    args = parser.parse_args(list(argv))
    protocol = vp.apply_protocol(parser, args, "vqa", "textvqa" if args.textvqa else "")
    common = va.parse_vlm(args, VQA_ATTACKS)
    n_references = positive_int(args.references, "--references")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    textvqa = None
    if args.textvqa is not None and args.images:
        questions, annotations, textvqa, name = Path(args.textvqa), Path(args.textvqa), True, "textvqa"
        images = Path(args.images)
    elif args.data is not None:
        root = Path(args.data)
        questions, annotations = root / "vqa" / "questions.json", root / "vqa" / "annotations.json"
        images, name = Path(args.images) if args.images else root / "images", "shapesworld/vqa"
    elif args.questions and args.images:
        questions, images, name = Path(args.questions), Path(args.images), "vqav2"
        annotations = Path(args.annotations) if args.annotations else None
    else:
        raise ConfigError("give --data SHAPESWORLD_ROOT, or --questions and --images (and --annotations)")
    for path in (questions, annotations):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    predictions = Path(args.predictions) if args.predictions else None
    if predictions is not None:
        check_output_path(predictions, "--predictions")
    if annotations is None and predictions is None:
        raise ConfigError(
            "without --annotations there are no answers to score: give --predictions FILE to write the "
            "clean answers in VQAv2's submission format"
        )
    if annotations is None and args.attack != "none":
        raise ConfigError(
            f"--attack {args.attack} needs the human answers (--annotations); without them only the "
            "clean answers are written: pass --attack none"
        )
    model = va.load_from_args(args)
    vp.use_template(model, args.template)
    if textvqa:
        data = TextVQA(questions, images, transform=model_transform(model))
    else:
        data = VQAv2(
            questions,
            annotations,
            images,
            transform=model_transform(model),
            image_pattern=args.image_pattern,
        )
    data = vp.protocol_subset(protocol, data)
    spec = common.spec.replace(dataset_name=args.dataset_name or name)
    if predictions is not None:
        answers = vqa_predictions(model, data, spec, suffix=args.suffix)
        write_json(predictions, answers)
        where = dict(task="vqa-predictions", model=spec.model_name, dataset=spec.dataset_name, attack="none")
        done = state_path(common.state_dir, **where, steps=0, eps=0.0)
        done.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            done.parent.rmdir()
        print(f"wrote {len(answers)} clean answers to {predictions} (VQAv2's format)", file=sys.stderr)
        if annotations is None:
            return 0
    rows = evaluate_vqa(
        model,
        data,
        spec,
        n_references=n_references,
        targets=targets,
        broken_at=va.broken_at(args.broken_at),
        suffix=args.suffix,
    )
    return va.finish(vp.stamp(rows, protocol, model), common.out, common.state_dir, common.checkpoint)
