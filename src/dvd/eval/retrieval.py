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
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from dvd.attacks import apgd, from_callable, pgd
from dvd.config import ConfigError, positive_int, suggest
from dvd.data.retrieval import RetrievalData, load_retrieval
from dvd.eval.arguments import parse_common
from dvd.eval.batching import evaluation_mode
from dvd.eval.clip_cli import DEFAULT_EPS, add_clip_arguments, finish, load_clip, wds_path, write_marked
from dvd.eval.results import ResultRow, eps_text, state_path
from dvd.eval.samples import retrieval_records, writer_for
from dvd.eval.spec import EvalSpec, clip_defaults
from dvd.io import atomic_write

__all__ = ["DEFAULT_EPS", "evaluate_retrieval", "image_to_text_hits", "recall_at_k", "text_to_image_hits"]
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
    spec: EvalSpec | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    **settings: Any,
) -> list[ResultRow]:
    """Recall@k both ways, clean and (per eps) with every image attacked; rows per metric and eps.

    ``spec`` (or its fields as keywords) holds the common settings: attack ``apgd`` (default), ``pgd`` or
    ``none``, 64 images a batch. ``spec.save_samples``: a directory for per-image records and adversarial
    images (:mod:`dvd.eval.samples`)."""
    spec = EvalSpec.of(spec, settings, **clip_defaults(model, data), attack="apgd")
    attack, batch_size = str(spec.attack), int(spec.batch_size or 64)
    if attack not in ATTACKS:
        raise ConfigError(f"unknown retrieval attack {attack!r}{suggest(attack, ATTACKS)}")
    budgets = [] if attack == "none" else [float(e) for e in spec.eps_list if e > 0]
    with evaluation_mode(model):
        tick = time.perf_counter()
        found = _clean_pass(model, data, batch_size, spec.limit, spec.progress)
        clean_features, captions, text_to_image = found
        if not captions:
            name = spec.dataset_name
            raise ValueError(f"{name} yielded no image with captions; check the dataset and split")
        text_features = _encode_texts(model, captions, batch_size=max(batch_size, 256))
        clean = recall_at_k(clean_features @ text_features.t(), text_to_image, ks)
        clean_seconds = time.perf_counter() - tick
        n = (len(clean_features), len(captions))
        rows: list[ResultRow] = []
        if not budgets:
            rows += _rows(spec, clean, None, attack="none", eps=0.0, steps=0, n=n, seconds=clean_seconds,
                          skipped=data.skipped)
        for eps in budgets:
            run = _AttackRun(
                model,
                data,
                text_features,
                text_to_image,
                eps=eps,
                attack=attack,
                steps=spec.steps,
                batch_size=batch_size,
                limit=spec.limit,
                seed=spec.seed,
                progress=spec.progress,
                n_images=len(clean_features),
                label=f"{spec.dataset_name} {attack} eps={eps_text(eps)}",
                writer=writer_for(spec.save_samples, task="retrieval", model=spec.model_name,
                                  dataset=spec.dataset_name, attack=attack, eps=eps),
                captions=captions,
                clean_features=clean_features,
            )
            key = {
                "model": spec.model_name,
                "dataset": spec.dataset_name,
                "attack": attack,
                "eps": eps,
                "steps": spec.steps,
                "seed": spec.seed,
                "batch_size": batch_size,
                "limit": spec.limit,
                "n": len(clean_features),
                "model_fingerprint": _digest(torch.cat([clean_features, text_features])),
            }
            path = None
            if spec.state_dir is not None:
                where = dict(task="retrieval", model=spec.model_name, dataset=spec.dataset_name)
                path = state_path(
                    spec.state_dir, **where, attack=attack, steps=spec.steps, eps=eps, suffix=".safetensors"
                )
            adversarial_features, seconds = run.run(path, key)
            robust = recall_at_k(adversarial_features @ text_features.t(), text_to_image, ks)
            rows += _rows(spec, clean, robust, attack=attack, eps=eps, steps=spec.steps, n=n,
                          seconds=clean_seconds + seconds, skipped=data.skipped)
    return rows


def _rows(
    spec: EvalSpec,
    clean: dict[str, float],
    robust: dict[str, float] | None,
    *,
    attack: str,
    eps: float,
    steps: int,
    n: tuple[int, int],
    seconds: float,
    skipped: int,
) -> list[ResultRow]:
    return [
        spec.row(
            task="retrieval",
            metric=metric,
            attack=attack,
            eps=eps,
            steps=steps,
            clean=value,
            adversarial=None if robust is None else robust[metric],
            n=n[0] if metric.startswith("image_to_text") else n[1],
            seconds=seconds,
            skipped=skipped,
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
    add_clip_arguments(parser, attack="apgd", attack_help="apgd (default), pgd or none")
    parser.add_argument(
        "--dataset",
        required=True,
        help="ShapesWorld root, COCO captions .json, CLIP_benchmark retrieval dir, wds/<name>, .tar shards",
    )
    parser.add_argument(
        "--dataset-name", default=None, help="name for the result rows (e.g. coco, flickr30k)"
    )
    parser.add_argument("--image-root", default=None, help="image directory of a COCO captions .json")
    parser.add_argument("--karpathy", default=None, help="Karpathy split file (dataset_coco.json style)")
    parser.add_argument(
        "--split", default=None, help="Karpathy split or CLIP_benchmark split folder (default test)"
    )
    parser.add_argument("--ks", default="1,5,10", help="recall@k cut-offs")
    args = parser.parse_args(list(argv))

    def check_attack(name: str) -> None:
        if name not in ATTACKS:
            raise ConfigError(f"unknown retrieval attack {name!r}{suggest(name, ATTACKS)}")

    ks = [positive_int(k, "--ks") for k in args.ks.split(",") if k.strip()]
    common = parse_common(args, kind="CLIP", check_attack=check_attack)
    model, transform = load_clip(args, common.spec.model_name)
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
    rows = evaluate_retrieval(model, data, common.spec.replace(dataset_name=data.name), ks=ks)
    write_marked(common.out, rows, common.checkpoint)
    return finish(rows, common.out, common.state_dir, suffix=".safetensors")
