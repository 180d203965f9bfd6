"""``dvd eval caption``: corpus CIDEr of a VLM's greedy captions, clean and under the worst-case ensemble.

The metric (COCO's PTB tokenisation and CIDEr-D) is :mod:`dvd.eval.cider`; its names are re-exported here.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.config import ConfigError, positive_int
from dvd.data.captions import CocoCaptions
from dvd.data.transforms import image_transform
from dvd.eval import vlm_attack as va
from dvd.eval import vlm_protocols as vp
from dvd.eval.cider import CiderScorer, cider, cider_per_image, clean_and_worst, ptb_tokenize
from dvd.eval.results import ResultRow
from dvd.eval.spec import VLM_DEFAULTS, EvalSpec
from dvd.io import read_json
from dvd.models.llava_preprocess import model_transform
from dvd.models.vlm_base import VisionLanguageModel

__all__ = ["CiderScorer", "cider", "cider_per_image", "evaluate_captioning", "ptb_tokenize"]

DEFAULT_PROMPT = "Provide a short caption for this image."  # LLaVA-1.5's COCO caption prompt in RobustVLM
CAPTION_ATTACKS = va.REFERENCE_ATTACKS
SHORT_ANSWER_MARK = "single word or phrase"  # LLaVA's VQA suffix: those prompts are not caption prompts


def instruct_caption_prompt(instruct_json: str | Path) -> str | None:
    """The most frequent free-form prompt of a LLaVA instruction file whose answers are sentences (> 3
    words), i.e. the caption prompt the model was tuned with; None if there is none."""
    counts: Counter[str] = Counter()
    for entry in read_json(instruct_json):
        turns = entry.get("conversations", []) if isinstance(entry, dict) else []
        for human, gpt in zip(turns[::2], turns[1::2], strict=False):
            if not (isinstance(human, dict) and isinstance(gpt, dict)):
                continue
            prompt = str(human.get("value", "")).replace("<image>", "").strip()
            if prompt and SHORT_ANSWER_MARK not in prompt and len(str(gpt.get("value", "")).split()) > 3:
                counts[prompt] += 1
    return counts.most_common(1)[0][0] if counts else None


@dataclass
class CaptionSource:
    """Where COCO-format caption data lives; :meth:`load` builds the reader once the image size is known."""

    annotations: Path | None
    images: Path
    karpathy: Path | None
    split: str | None
    name: str
    prompt: str

    def load(self, image_size: int, transform: Any = None) -> Any:
        """The reader; ``transform`` (e.g. the model's own LLaVA preprocessing) or open_clip's."""
        return CocoCaptions(
            self.annotations,
            self.images,
            transform=transform or image_transform(image_size),
            karpathy_json=self.karpathy,
            split=self.split,
        )


def add_caption_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="a ShapesWorld root (captions/, images/, llava/)")
    parser.add_argument("--annotations", default=None, help="COCO captions JSON (images + annotations)")
    parser.add_argument("--karpathy", default=None, help="Karpathy split JSON (dataset_coco.json style)")
    parser.add_argument("--split", default=None, help="Karpathy split to evaluate (default test)")
    parser.add_argument("--images", default=None, help="image root")
    parser.add_argument(
        "--prompt",
        default=None,
        help=f"caption prompt (default {DEFAULT_PROMPT!r}, or the ShapesWorld instruction data's own)",
    )


def caption_source(args: argparse.Namespace) -> CaptionSource:
    """The caption data named on the command line, its files checked to exist."""
    if args.data is not None:
        root = Path(args.data)
        if not (root / "captions" / "annotations.json").is_file():
            raise FileNotFoundError(
                f"{root}/captions/annotations.json not found; is --data a ShapesWorld root?"
            )
        instruct = root / "llava" / "stage2_instruct.json"
        prompt = args.prompt or (instruct_caption_prompt(instruct) if instruct.is_file() else None)
        return CaptionSource(
            annotations=root / "captions" / "annotations.json",
            images=Path(args.images) if args.images else root / "images",
            karpathy=root / "captions" / "karpathy_split.json",
            split=args.split or "test",
            name=args.dataset_name or "shapesworld/captions",
            prompt=prompt or DEFAULT_PROMPT,
        )
    if args.images is None or (args.annotations is None and args.karpathy is None):
        raise ConfigError(
            "give --data SHAPESWORLD_ROOT, or --images DIR with --annotations and/or --karpathy"
        )
    for flag, value in (("--annotations", args.annotations), ("--karpathy", args.karpathy)):
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"{flag} {value}: no such file")
    return CaptionSource(
        annotations=Path(args.annotations) if args.annotations else None,
        images=Path(args.images),
        karpathy=Path(args.karpathy) if args.karpathy else None,
        split=(args.split or "test") if args.karpathy else None,
        name=args.dataset_name or "coco",
        prompt=args.prompt or DEFAULT_PROMPT,
    )


@dataclass
class _Captioning:
    """The caption task for :func:`dvd.eval.vlm_attack.evaluate_outputs`."""

    prompt_text: str
    references_by_position: dict[int, list[str]]
    selection: CiderScorer

    def prompt(self, item: dict[str, Any]) -> str:
        return self.prompt_text

    def references(self, position: int, item: dict[str, Any]) -> list[str]:
        return self.references_by_position[position]

    def score(self, position: int, item: dict[str, Any], text: str) -> float:
        return self.selection(position, text)

    def record(self, position: int, item: dict[str, Any]) -> dict[str, Any]:
        return {"image_id": item["image_id"]}


def evaluate_captioning(
    model: VisionLanguageModel,
    data: Any,
    spec: EvalSpec | None = None,
    *,
    n_references: int = 5,
    broken_at: float = 0.1,
    prompt: str = DEFAULT_PROMPT,
    **settings: Any,
) -> list[ResultRow]:
    """Corpus CIDEr of greedy captions, clean and under attack, one row per budget (eps 0: clean only).

    ``data`` is a :class:`dvd.data.captions.CocoCaptions`; ``spec`` (or its fields as keywords) the common
    settings. ``attack="ensemble"`` (default) is the paper's protocol (:mod:`dvd.eval.vlm_ensemble`: APGD
    against each of ``n_references`` reference captions in ``spec.precision``, then fp32 against the best
    one, keeping each image's lowest-CIDEr caption; images at CIDEr <= ``broken_at`` are not attacked
    further); ``"apgd"`` is one fp32 APGD on the first reference. With ``spec.state_dir`` the evaluation
    saves its outputs after every batch and a rerun resumes.
    """
    defaults = {**VLM_DEFAULTS, "attack": "ensemble", "dataset_name": "coco", "max_new_tokens": 20}
    spec = EvalSpec.of(spec, settings, **defaults)
    if spec.attack not in CAPTION_ATTACKS:
        raise ValueError(f"unknown caption attack {spec.attack!r}; choose from {', '.join(CAPTION_ATTACKS)}")
    end = len(data) if spec.limit is None else min(spec.limit, len(data))
    references = {i: list(data.records[i]["fields"]["captions"]) for i in range(end)}
    task = _Captioning(prompt, references, CiderScorer(references))  # the corpus idf, known up front
    budgets = va.reference_outputs(
        model, data, task, spec=spec, task_name="caption", n_references=n_references, broken_at=broken_at,
        settings={"prompt": prompt},
    )
    rows = []
    for budget in budgets:
        clean, adversarial = caption_scores(references, budget.samples)
        rows += va.budget_rows(spec, budget, "caption", {"cider": (clean, adversarial)}, len(budget.samples))
    return rows


def caption_scores(
    references: Mapping[int, Sequence[str]], samples: Sequence[Mapping[str, Any]]
) -> tuple[float, float]:
    """Corpus CIDEr of the clean captions (each sample's first output) and of each sample's lowest-CIDEr
    output, over the evaluated images' references."""
    scores = list(clean_and_worst(references, {s["position"]: s["outputs"] for s in samples}).values())
    return sum(c for c, _ in scores) / len(scores), sum(w for _, w in scores) / len(scores)


def cli(argv: Sequence[str]) -> int:
    """``dvd eval caption``: CIDEr of a VLM's captions, clean and under attack."""
    parser = argparse.ArgumentParser(prog="dvd eval caption", description=cli.__doc__)
    va.add_vlm_arguments(parser, attacks=CAPTION_ATTACKS, attack="ensemble")
    add_caption_data_arguments(parser)
    vp.add_protocol_arguments(parser)
    parser.add_argument("--references", default="5", help="reference captions attacked per image (ensemble)")
    parser.add_argument(
        "--broken-at",
        type=float,
        default=0.1,
        help="images whose CIDEr falls to this are not attacked further (RobustVLM: 10 on the x100 scale)",
    )
    args = parser.parse_args(list(argv))
    protocol = vp.apply_protocol(parser, args, "caption")
    common = va.parse_vlm(args, CAPTION_ATTACKS)
    n_references = positive_int(args.references, "--references")
    source = caption_source(args)
    model = va.load_from_args(args)
    vp.use_template(model, args.template)
    data = vp.protocol_subset(protocol, source.load(model.image_size, model_transform(model)))
    print(f"caption prompt: {source.prompt!r}", file=sys.stderr)
    rows = evaluate_captioning(
        model,
        data,
        common.spec.replace(dataset_name=source.name),
        n_references=n_references,
        broken_at=va.broken_at(args.broken_at),
        prompt=source.prompt,
    )
    return va.finish(vp.stamp(rows, protocol, model), common.out, common.state_dir, common.checkpoint)
