"""``dvd attack``: attack given images and keep the adversarial ones (the command a red-teamer runs).

Images come from a folder (searched recursively) or webdataset tar shards, resized and centre-cropped to
the model's input. Against a CLIP, the zero-shot classifier over ``--labels`` is attacked with dvd's
ensemble (``--attack``: ``aa-standard`` or a comma list); an image's label is its folder's name when that
is one of the labels, else the class the model picks on the clean image. Against a VLM, APGD maximises
the NLL of ``--answer`` (default: the model's own clean answer) or, with ``--target``, minimises the NLL
of the target string. The adversarial images and one JSONL record per image (clean and adversarial
prediction or output, whether it changed, the attack that broke it) go to ``--out`` via
:mod:`dvd.eval.samples`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from dvd.attacks import evaluate_robustness
from dvd.config import ConfigError, parse_eps, positive_int
from dvd.data.image_text import ShardStream
from dvd.data.transforms import decode_image, image_transform
from dvd.data.zeroshot import IMAGE_EXTENSIONS
from dvd.eval import vlm_attack as va
from dvd.eval.batching import evaluation_mode
from dvd.eval.samples import SampleWriter
from dvd.eval.zeroshot_classifier import ZeroShotClassifier, resolve_attacks
from dvd.models.clip import create_clip

DEFAULT_TEMPLATE = "a photo of a {c}."


def read_images(
    source: str, size: int, limit: int | None = None
) -> Iterator[tuple[str, str | None, torch.Tensor]]:
    """``(id, folder name or None, image (3, size, size) in [0, 1])`` for a folder or tar shard(s)."""
    transform = image_transform(size)
    path = Path(source)
    count = 0
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
        for file in files[:limit]:
            folder = file.parent.name if file.parent != path else None
            yield str(file.relative_to(path).with_suffix("")), folder, transform(decode_image(file))
        return
    if ".tar" not in source:
        raise FileNotFoundError(f"{source} is neither a folder of images nor webdataset .tar shard(s)")
    stream = ShardStream(source, transform=transform, target=lambda sample: sample["__key__"],
                         split_by_node=False)
    for image, key in stream:
        if limit is not None and count >= limit:
            return
        count += 1
        yield str(key), None, image


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def attack_clip(args: argparse.Namespace, eps: float, writer: SampleWriter) -> int:
    """Zero-shot classification over ``--labels``: dvd's ensemble; returns how many predictions changed."""
    labels = [name.strip() for name in args.labels.split(",") if name.strip()]
    if len(labels) < 2:
        raise ConfigError("--labels needs at least two comma-separated class names for a CLIP")
    attacks = resolve_attacks(args.attack or "aa")
    torch.manual_seed(args.seed)  # a randomly initialised model (config JSON) is the same on every rerun
    model = create_clip(args.clip, pretrained=args.pretrained, device=args.device)
    changed = 0
    with evaluation_mode(model):
        classifier = ZeroShotClassifier(model, labels, [args.template])
        for batch in _batches(read_images(args.images, model.image_size, args.limit), args.batch_size):
            ids, folders, images = zip(*batch, strict=True)
            x = torch.stack(images).to(args.device)
            with torch.no_grad():
                clean = classifier(x).argmax(dim=1)
            given = zip(folders, clean.tolist(), strict=True)
            y = torch.tensor([labels.index(f) if f in labels else c for f, c in given], device=x.device)
            result = evaluate_robustness(classifier, x, y, eps=eps, attacks=attacks, steps=args.steps,
                                         seed=args.seed, eot=args.eot)
            with torch.no_grad():
                attacked = classifier(result.adversarial).argmax(dim=1)
            records = []
            for i, key in enumerate(ids):
                flipped = int(attacked[i]) != int(clean[i])
                changed += flipped
                records.append({"id": key, "label": labels[int(y[i])], "clean": labels[int(clean[i])],
                                "adversarial": labels[int(attacked[i])], "changed": flipped,
                                "broken_by": result.attack_of[i], "loss": float(result.loss[i])})
            writer.write(records, result.adversarial)
    return changed


def attack_vlm(args: argparse.Namespace, eps: float, writer: SampleWriter) -> int:
    """APGD on a VLM's answer NLL (untargeted) or a target's (targeted); returns how many outputs changed."""
    model = va.load_model(args.vlm, device=args.device)
    changed = 0
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    with evaluation_mode(model):
        for batch in _batches(read_images(args.images, model.image_size, args.limit), args.batch_size):
            ids, _, images = zip(*batch, strict=True)
            x = torch.stack(images).to(model.device)
            prompts = [args.prompt] * len(ids)
            clean = model.generate(x, prompts, max_new_tokens=args.max_new_tokens)
            targeted = args.target is not None
            answers = [args.target] * len(ids) if targeted else [args.answer or c for c in clean]
            adversarial = va.attack_answers(model, x, prompts, answers, eps=eps, steps=args.steps,
                                            generator=generator, targeted=targeted)
            outputs = model.generate(adversarial, prompts, max_new_tokens=args.max_new_tokens)
            records = []
            for i, key in enumerate(ids):
                flipped = outputs[i].strip() != clean[i].strip()
                changed += flipped
                record = {"id": key, "prompt": args.prompt, "clean": clean[i], "adversarial": outputs[i],
                          "changed": flipped, "attacked_answer": answers[i], "targeted": targeted}
                if targeted:
                    record["target_in_output"] = args.target.lower() in outputs[i].lower()
                records.append(record)
            writer.write(records, adversarial)
    return changed


def cli(argv: Sequence[str]) -> int:
    """``dvd attack``: attack a folder or shard of images against a CLIP or a VLM; save what changed."""
    parser = argparse.ArgumentParser(prog="dvd attack", description=cli.__doc__)
    parser.add_argument("--images", required=True, help="a folder of images, or webdataset shard(s) .tar")
    parser.add_argument("--out", required=True, help="directory for adversarial images + attack.jsonl")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--clip", help="open_clip name, config .json or checkpoint dir (zero-shot labels)")
    model.add_argument("--vlm", help="dvd VLM checkpoint dir, or HF LLaVA name / local dir")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file")
    parser.add_argument("--labels", default=None, help="CLIP: comma-separated class names")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"CLIP prompt ({DEFAULT_TEMPLATE!r})")
    parser.add_argument("--attack", default=None, help="CLIP: aa (default), aa-standard or a comma list")
    parser.add_argument("--eot", default=None, help="CLIP: average gradients over N draws")
    parser.add_argument("--prompt", default="Provide a short caption for this image.", help="VLM prompt")
    parser.add_argument("--answer", default=None, help="VLM: answer to push away from (default: its own)")
    parser.add_argument("--target", default=None, help="VLM: target string to make it write")
    parser.add_argument("--max-new-tokens", default="20")
    parser.add_argument("--eps", default="4/255", help="L-inf budget (default 4/255)")
    parser.add_argument("--eps-unit", type=float, default=None, help="divide --eps by this, e.g. 255")
    parser.add_argument("--steps", default="100")
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--limit", default=None, help="attack the first N images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(list(argv))

    eps = parse_eps(args.eps, args.eps_unit)
    if eps <= 0:
        raise ConfigError("--eps must be > 0 for an attack, e.g. --eps 4/255")
    args.steps = positive_int(args.steps, "--steps")
    args.batch_size = positive_int(args.batch_size, "--batch-size")
    args.max_new_tokens = positive_int(args.max_new_tokens, "--max-new-tokens")
    args.limit = None if args.limit is None else positive_int(args.limit, "--limit")
    args.eot = None if args.eot is None else positive_int(args.eot, "--eot")
    if args.clip and args.labels is None:
        raise ConfigError("--clip needs --labels, e.g. --labels cat,dog,car")
    if args.vlm and (args.labels is not None or args.attack is not None):
        raise ConfigError("--labels and --attack are for --clip; a VLM takes --answer or --target")
    if args.clip and (args.answer is not None or args.target is not None):
        raise ConfigError("--answer and --target are for --vlm; a CLIP takes --labels")
    if args.target is not None and not args.target.strip():
        raise ConfigError("--target is empty; give the string the VLM should write")
    writer = SampleWriter(args.out, "attack")
    changed = attack_clip(args, eps, writer) if args.clip else attack_vlm(args, eps, writer)
    print(f"{changed} of {len(writer.seen)} outputs changed; wrote {writer.path} and {writer.images}/",
          file=sys.stderr)
    return 0
