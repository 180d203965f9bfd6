"""Image-text retrieval recall@k with CLIP, clean and with attacked images.

Image->text: an image is a hit at k when one of its own captions is among its k best-scoring
captions; text->image: a caption is a hit when its image is among the k best-scoring images. Ties
count against the model (a constant embedding retrieves nothing), so a collapsed model cannot score.

The attack perturbs every image within an L-inf ball to maximise the cross-entropy of its own
captions over the whole caption set (``-log sum_own softmax(s * f(x) . T)``), i.e. the retrieval
loss itself; recall is then measured with the adversarial image embeddings in both directions.
Per-sample adversarial embeddings are saved after every batch, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from dvd.config import ConfigError, parse_eps_list, positive_int, suggest
from dvd.data.retrieval import RetrievalData, load_retrieval
from dvd.eval import options
from dvd.eval.output import claim_output
from dvd.eval.results import (
    ResultRow,
    check_model_name,
    eps_text,
    format_table,
    remove_states,
    state_path,
    write_rows,
)
from dvd.eval.samples import retrieval_records, writer_for
from dvd.eval.zeroshot import evaluation_mode, wds_path
from dvd.io import atomic_write, versions

DEFAULT_EPS = "1/255,2/255,4/255"
ATTACKS = ("apgd", "pgd", "none")
DEFAULT_KS = (1, 5, 10)


def image_to_text_hits(similarity: torch.Tensor, text_to_image: torch.Tensor, k: int) -> torch.Tensor:
    """(N_img,) bool: some own caption is ranked within the top ``k`` captions of each image.

    ``similarity`` is (N_img, N_txt); ``text_to_image[j]`` is the image of caption j. The rank of an
    image's best own caption counts the *other* captions scoring at least as high (ties pessimistic).
    """
    n_images = similarity.shape[0]
    own = text_to_image.view(1, -1) == torch.arange(n_images, device=similarity.device).view(-1, 1)
    best_own = similarity.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
    rank = ((similarity >= best_own) & ~own).sum(dim=1)
    return (rank < k) & own.any(dim=1)


def text_to_image_hits(similarity: torch.Tensor, text_to_image: torch.Tensor, k: int) -> torch.Tensor:
    """(N_txt,) bool: each caption's image is ranked within its top ``k`` images (ties pessimistic)."""
    scores = similarity.t()  # (N_txt, N_img)
    own_score = scores.gather(1, text_to_image.view(-1, 1))
    others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, text_to_image.view(-1, 1), False)
    rank = ((scores >= own_score) & others).sum(dim=1)
    return rank < k


def recall_at_k(
    similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """``{"image_to_text_recall@k": r, "text_to_image_recall@k": r}`` for every k (fractions in [0, 1])."""
    out = {}
    for k in ks:
        out[f"image_to_text_recall@{k}"] = (
            image_to_text_hits(similarity, text_to_image, k).float().mean().item()
        )
        out[f"text_to_image_recall@{k}"] = (
            text_to_image_hits(similarity, text_to_image, k).float().mean().item()
        )
    return out


def evaluate_retrieval(
    model: nn.Module,
    data: RetrievalData,
    *,
    eps_list: Sequence[float],
    attack: str = "apgd",
    steps: int = 100,
    limit: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    model_name: str | None = None,
    dataset_name: str | None = None,
    state_dir: str | Path | None = None,
    progress: bool = True,
    save_samples: str | Path | None = None,
) -> list[ResultRow]:
    """Recall@k both ways, clean and (per eps) with every image attacked; rows per metric and eps.
    ``save_samples``: a directory for per-image records and adversarial images (:mod:`dvd.eval.samples`)."""
    if attack not in ATTACKS:
        raise ConfigError(f"unknown retrieval attack {attack!r}{suggest(attack, ATTACKS)}")
    model_name = model_name or getattr(model, "model_name", "model")
    dataset_name = dataset_name or data.name
    budgets = [] if attack == "none" else [float(e) for e in eps_list if e > 0]
    with evaluation_mode(model):
        tick = time.perf_counter()
        clean_features, captions, text_to_image = _clean_pass(model, data, batch_size, limit, progress)
        if not captions:
            raise ValueError(f"{dataset_name} yielded no image with captions; check the dataset and split")
        text_features = _encode_texts(model, captions, batch_size=max(batch_size, 256))
        clean = recall_at_k(clean_features @ text_features.t(), text_to_image, ks)
        clean_seconds = time.perf_counter() - tick
        common = dict(
            model=model_name,
            task="retrieval",
            dataset=dataset_name,
            seed=seed,
            versions=versions(),
            skipped=data.skipped,
        )
        rows: list[ResultRow] = []
        if not budgets:
            rows += _rows(
                common,
                clean,
                None,
                attack="none",
                eps=0.0,
                steps=0,
                n=(len(clean_features), len(captions)),
                seconds=clean_seconds,
            )
        for eps in budgets:
            run = _AttackRun(
                model,
                data,
                text_features,
                text_to_image,
                eps=eps,
                attack=attack,
                steps=steps,
                batch_size=batch_size,
                limit=limit,
                seed=seed,
                progress=progress,
                n_images=len(clean_features),
                label=f"{dataset_name} {attack} eps={eps_text(eps)}",
                writer=writer_for(save_samples, task="retrieval", model=model_name, dataset=dataset_name,
                                  attack=attack, eps=eps),
                captions=captions,
                clean_features=clean_features,
            )
            key = {
                "model": model_name,
                "dataset": dataset_name,
                "attack": attack,
                "eps": eps,
                "steps": steps,
                "seed": seed,
                "batch_size": batch_size,
                "limit": limit,
                "n": len(clean_features),
                "model_fingerprint": _digest(torch.cat([clean_features, text_features])),
            }
            path = None
            if state_dir is not None:
                path = state_path(
                    state_dir,
                    task="retrieval",
                    model=model_name,
                    dataset=dataset_name,
                    attack=attack,
                    steps=steps,
                    eps=eps,
                    suffix=".safetensors",
                )
            adversarial_features, seconds = run.run(path, key)
            robust = recall_at_k(adversarial_features @ text_features.t(), text_to_image, ks)
            rows += _rows(
                common,
                clean,
                robust,
                attack=attack,
                eps=eps,
                steps=steps,
                n=(len(clean_features), len(captions)),
                seconds=clean_seconds + seconds,
            )
    return rows


def _rows(
    common: dict[str, Any],
    clean: dict[str, float],
    robust: dict[str, float] | None,
    *,
    attack: str,
    eps: float,
    steps: int,
    n: tuple[int, int],
    seconds: float,
) -> list[ResultRow]:
    return [
        ResultRow(
            **common,
            metric=metric,
            attack=attack,
            eps=eps,
            steps=steps,
            clean=value,
            adversarial=None if robust is None else robust[metric],
            n=n[0] if metric.startswith("image_to_text") else n[1],
            seconds=round(seconds, 3),
            flags=[],
        )
        for metric, value in clean.items()
    ]


@torch.no_grad()
def _clean_pass(
    model: nn.Module, data: RetrievalData, batch_size: int, limit: int | None, progress: bool
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Clean image features (N, D), the flat caption list and each caption's image index.

    Sets ``data.skipped``: the samples of this pass left out (unreadable, or without captions).
    """
    features, captions, owner, n_images, read = [], [], [], 0, 0
    bar = tqdm(desc=f"{data.name} clean", unit="img", disable=not progress, file=sys.stderr)
    device = _device_of(model)
    for start, end, images, caption_lists in _batches(data.dataset, batch_size, start=0, limit=limit):
        read += end - start
        if not caption_lists:
            continue
        features.append(_encode_images(model, images.to(device)))
        for refs in caption_lists:
            owner += [n_images] * len(refs)
            captions += refs
            n_images += 1
        bar.update(len(caption_lists))
    bar.close()
    data.skipped = read - n_images + getattr(data.dataset, "skipped_count", 0)  # + those a stream dropped
    image_features = torch.cat(features) if features else torch.empty(0, 0, device=device)
    return image_features, captions, torch.as_tensor(owner, dtype=torch.long, device=device)


@torch.no_grad()
def _encode_texts(model: nn.Module, captions: Sequence[str], *, batch_size: int) -> torch.Tensor:
    chunks = [
        model.encode_text(model.tokenize(captions[i : i + batch_size]))
        for i in range(0, len(captions), batch_size)
    ]
    return torch.cat(chunks).float()


@dataclass
class _AttackRun:
    """Attack every image of the set against its own captions; adversarial features saved per batch."""

    model: nn.Module
    data: RetrievalData
    text_features: torch.Tensor
    text_to_image: torch.Tensor
    eps: float
    attack: str = "apgd"
    steps: int = 100
    batch_size: int = 64
    limit: int | None = None
    seed: int = 0
    n_images: int = 0
    label: str = ""
    progress: bool = False
    writer: Any = None  # a dvd.eval.samples.SampleWriter for --save-samples
    captions: list[str] | None = None
    clean_features: torch.Tensor | None = None

    @property
    def scale(self) -> float:
        return float(self.model.logit_scale.detach())

    def run(self, path: Path | None, key: dict[str, Any]) -> tuple[torch.Tensor, float]:
        """Adversarial image features (N, D) of the whole set, resuming from ``path``; and seconds spent."""
        features, position, seconds = _load_state(path, key)
        done = sum(f.shape[0] for f in features)
        bar = tqdm(
            total=self.n_images,
            initial=done,
            desc=self.label,
            unit="img",
            disable=not self.progress,
            file=sys.stderr,
        )
        device = self.text_features.device
        for start, end, images, _ in _batches(
            self.data.dataset, self.batch_size, start=position, limit=self.limit
        ):
            tick = time.perf_counter()
            if len(images):
                index = torch.arange(done, done + len(images), device=device)
                adversarial = self._attack(images.to(device), index, seed=self.seed + start)
                features.append(_encode_images(self.model, adversarial))
                if self.writer is not None:
                    records = retrieval_records(index, self.clean_features[index], features[-1],
                                                self.text_features, self.text_to_image, self.captions,
                                                self.attack)
                    self.writer.write(records, adversarial)
                done += len(images)
            seconds += time.perf_counter() - tick
            _save_state(path, key, features, end, seconds)
            bar.update(len(images))
        bar.close()
        if done != self.n_images:
            raise ValueError(
                f"{self.label}: the data gave {done} images on this pass but {self.n_images} before"
            )
        return torch.cat(features), seconds

    def _attack(self, images: torch.Tensor, index: torch.Tensor, *, seed: int) -> torch.Tensor:
        from dvd.attacks import apgd, from_callable, pgd

        own = self.text_to_image.view(1, -1) == index.view(-1, 1)  # (B, N_txt): the image's own captions
        objective = from_callable(self._caption_set_loss, batch={"own": own})
        generator = torch.Generator(device=images.device).manual_seed(seed)
        attack = apgd if self.attack == "apgd" else pgd
        return attack(objective, images, eps=self.eps, steps=self.steps, generator=generator).detach()

    def _caption_set_loss(self, x: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """-log of the softmax mass on the image's own captions, over the whole caption set."""
        logits = self.scale * self.model.encode_image(x) @ self.text_features.t()
        own_logits = logits.masked_fill(~batch["own"], float("-inf"))
        return torch.logsumexp(logits, dim=1) - torch.logsumexp(own_logits, dim=1)


def _batches(
    dataset: Any, batch_size: int, *, start: int, limit: int | None
) -> Iterator[tuple[int, int, torch.Tensor, list[list[str]]]]:
    """``(position, next_position, images, captions)`` over image positions ``start`` to ``limit``.

    Positions count every sample read; corrupt ones (None from map-style readers) are left out.
    """
    if isinstance(dataset, torch.utils.data.IterableDataset):
        samples: Iterator[Any] = itertools.islice(dataset, start, limit)
    else:
        end = len(dataset) if limit is None else min(limit, len(dataset))
        samples = (dataset[i] for i in range(start, end))
    position = start
    while True:
        chunk = list(itertools.islice(samples, batch_size))
        if not chunk:
            return
        good = [item for item in chunk if item is not None and item[1]]
        images = torch.stack([image for image, _ in good]) if good else torch.empty(0)
        yield position, position + len(chunk), images, [list(refs) for _, refs in good]
        position += len(chunk)


def _encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Image features for ranking (no gradients; bf16 autocast on CUDA), the same for clean and attacked."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        return model.encode_image(images).float()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.float().cpu().numpy().round(4).tobytes()).hexdigest()[:16]


def _load_state(path: Path | None, key: dict[str, Any]) -> tuple[list[torch.Tensor], int, float]:
    """``([features so far], next position, seconds)`` from a state file written by the same configuration."""
    if path is None or not path.is_file():
        return [], 0, 0.0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("key") != json.dumps(key, sort_keys=True):
        return [], 0, 0.0
    tensors = load_file(str(path))
    features = [tensors["features"]] if tensors["features"].numel() else []
    device = torch.device(json.loads(meta["device"])) if "device" in meta else torch.device("cpu")
    return [f.to(device) for f in features], int(meta["position"]), float(meta["seconds"])


def _save_state(
    path: Path | None, key: dict[str, Any], features: list[torch.Tensor], position: int, seconds: float
) -> None:
    if path is None:
        return
    stacked = torch.cat(features).cpu().contiguous() if features else torch.empty(0)
    device = str(features[0].device) if features else "cpu"
    meta = {
        "key": json.dumps(key, sort_keys=True),
        "position": str(position),
        "seconds": repr(seconds),
        "device": json.dumps(device),
    }
    atomic_write(path, lambda tmp: save_file({"features": stacked}, str(tmp), metadata=meta))


def cli(argv: Sequence[str]) -> int:
    """``dvd eval retrieval``: image->text and text->image recall@k, clean and with attacked images."""
    parser = argparse.ArgumentParser(prog="dvd eval retrieval", description=cli.__doc__)
    parser.add_argument(
        "--model", required=True, help="open_clip name, hf-hub:org/name, config .json or checkpoint"
    )
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local weights file")
    parser.add_argument("--model-name", default=None, help="short name for the result rows")
    parser.add_argument(
        "--dataset",
        required=True,
        help="ShapesWorld root, COCO captions .json, CLIP_benchmark retrieval dir, wds/<name>, .tar shards",
    )
    parser.add_argument(
        "--dataset-root", default=None, help="root for wds/<name> ({dataset} placeholders allowed)"
    )
    parser.add_argument(
        "--dataset-name", default=None, help="name for the result rows (e.g. coco, flickr30k)"
    )
    parser.add_argument("--image-root", default=None, help="image directory of a COCO captions .json")
    parser.add_argument("--karpathy", default=None, help="Karpathy split file (dataset_coco.json style)")
    parser.add_argument(
        "--split", default=None, help="Karpathy split or CLIP_benchmark split folder (default test)"
    )
    parser.add_argument(
        "--eps", default=DEFAULT_EPS, help=f"comma-separated L-inf budgets (default {DEFAULT_EPS})"
    )
    parser.add_argument("--eps-unit", default=None, help="divide --eps by this, e.g. 255")
    parser.add_argument("--attack", default="apgd", help="apgd (default), pgd or none")
    parser.add_argument("--steps", default="100")
    parser.add_argument("--ks", default="1,5,10", help="recall@k cut-offs")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--limit", default=None, help="evaluate the first N images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", help="model weights precision (open_clip's names)")
    parser.add_argument("--out", default="results.json", help="result rows JSON (merged into if it exists)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--save-samples", default=None, help="directory for per-image JSONL records + adversarial images"
    )
    args = parser.parse_args(list(argv))

    if args.attack not in ATTACKS:
        raise ConfigError(f"unknown retrieval attack {args.attack!r}{suggest(args.attack, ATTACKS)}")
    # checked even with --attack none: a typo is a typo
    eps_list = parse_eps_list(args.eps, options.eps_unit(args.eps_unit))
    ks = [positive_int(k, "--ks") for k in args.ks.split(",") if k.strip()]
    steps = positive_int(args.steps, "--steps")
    batch_size = positive_int(args.batch_size, "--batch-size")
    limit = None if args.limit is None else positive_int(args.limit, "--limit")
    options.check_model_argument(args.model)
    out = claim_output(args.out)
    model_name = args.model_name or options.model_row_name(args.model, args.pretrained)
    checkpoint = options.model_checkpoint(args.model, args.pretrained)
    check_model_name(out, model_name, checkpoint)

    from dvd.data.transforms import image_transform
    from dvd.models.clip import create_clip

    torch.manual_seed(args.seed)  # a randomly initialised model (config JSON) is the same on every rerun
    model = create_clip(args.model, pretrained=args.pretrained, device=args.device, precision=args.precision)
    transform = image_transform(model.image_size)
    print(
        f"{model_name}: images are resized (shortest side) and centre-cropped to the model's "
        f"{model.image_size}x{model.image_size} input",
        file=sys.stderr,
    )
    spec, dataset_name = args.dataset, args.dataset_name
    if spec.startswith("wds/"):  # CLIP_benchmark's naming: wds/flickr30k under --dataset-root
        dataset_name = dataset_name or spec[len("wds/") :]
        spec = str(wds_path(spec[len("wds/") :], args.dataset_root))
    data = load_retrieval(
        spec,
        transform=transform,
        image_root=args.image_root,
        karpathy=args.karpathy,
        split=args.split,
        name=dataset_name,
    )
    state_dir = Path(f"{out}.partial")
    rows = evaluate_retrieval(
        model,
        data,
        eps_list=eps_list,
        attack=args.attack,
        steps=steps,
        limit=limit,
        batch_size=batch_size,
        seed=args.seed,
        ks=ks,
        model_name=model_name,
        state_dir=state_dir,
        progress=not args.no_progress,
        save_samples=args.save_samples,
    )
    write_rows(out, options.mark_rows(rows, checkpoint))
    remove_states(state_dir, rows, suffix=".safetensors")
    print(format_table(rows))
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    return 0
