"""Zero-shot classification with CLIP, clean and under attack (the paper's first table).

Class names x templates give a text classifier (per class: the mean of its template embeddings,
re-normalised), computed once per dataset. :class:`ZeroShotClassifier` maps [0, 1] images to logits,
so any attack of :mod:`dvd.attacks` runs on it in pixel space. The evaluation goes batch by batch and
saves its per-sample results after every batch: an interrupted run, rerun, continues where it stopped
and ends with the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dvd.config import ConfigError, parse_eps_list, positive_int, suggest
from dvd.eval import options
from dvd.eval.output import claim_output
from dvd.eval.results import (
    ResultRow,
    check_model_name,
    eps_text,
    flag_rising_robustness,
    format_table,
    load_state,
    remove_states,
    save_state,
    state_path,
    write_rows,
)
from dvd.io import versions

DEFAULT_EPS = "1/255,2/255,4/255"
ATTACKS: dict[str, tuple[str, ...]] = {
    "apgd-ce": ("apgd-ce",),
    "aa": ("apgd-ce", "apgd-t"),  # AutoAttack's white-box pair, as in the paper's protocol
    "pgd": (),  # plain PGD on the cross-entropy, run here (not an ensemble member)
    "none": (),
}
PLACEHOLDER = "{c}"


def resolve_attacks(attack: str) -> tuple[str, ...]:
    """The ensemble behind ``--attack``: a name above, ``aa-standard`` or a comma list of dvd's attacks."""
    if attack in ATTACKS:
        return ATTACKS[attack]
    from dvd.attacks import ATTACKS as ENSEMBLE_ATTACKS
    from dvd.attacks import PRESETS, parse_attacks

    known = sorted({*ATTACKS, *PRESETS, *ENSEMBLE_ATTACKS})
    for name in attack.split(",") if attack not in PRESETS else ():
        if name.strip() not in ENSEMBLE_ATTACKS:
            raise ConfigError(f"unknown attack {name.strip()!r}{suggest(name.strip(), known)}")
    try:
        return parse_attacks(attack)
    except ValueError as error:
        raise ConfigError(str(error)) from None


class ZeroShotData(Protocol):
    """What :func:`dvd.data.zeroshot.load_zeroshot` returns."""

    classnames: list[str]
    templates: list[str]
    name: str
    dataset: Iterable[tuple[torch.Tensor, int]]


@torch.no_grad()
def build_text_classifier(
    model: nn.Module, classnames: Sequence[str], templates: Sequence[str], *, batch_size: int = 256
) -> torch.Tensor:
    """(D, C) zero-shot weights: per class, the mean of its normalised template embeddings, re-normalised."""
    if not classnames or not templates:
        raise ConfigError("a zero-shot classifier needs at least one class name and one template")
    for template in templates:
        if PLACEHOLDER not in template:
            raise ConfigError(f"template {template!r} has no {PLACEHOLDER} placeholder for the class name")
    texts = [t.replace(PLACEHOLDER, c) for c in classnames for t in templates]
    chunks = [
        model.encode_text(model.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)
    ]
    features = F.normalize(torch.cat(chunks).float(), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1).t().contiguous()


class ZeroShotClassifier(nn.Module):
    """[0, 1] images -> class logits: ``logit_scale * image_features @ text_classifier``.

    The text classifier is computed once, here, and kept as a buffer; the scale is the model's own
    (exp'ed, frozen at construction), so the logits are the ones CLIP was trained to produce.
    """

    def __init__(
        self,
        model: nn.Module,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        text_batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.model = model
        self.classnames = list(classnames)
        self.register_buffer(
            "weights", build_text_classifier(model, classnames, templates, batch_size=text_batch_size)
        )
        self.scale = float(model.logit_scale.detach())

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * self.model.encode_image(images) @ self.weights


def evaluate_zeroshot(
    model: nn.Module,
    data: ZeroShotData,
    *,
    eps_list: Sequence[float],
    attack: str = "apgd-ce",
    steps: int = 100,
    limit: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    model_name: str | None = None,
    dataset_name: str | None = None,
    state_dir: str | Path | None = None,
    attack_precision: str | None = None,
    check: bool = True,
    text_batch_size: int = 256,
    workers: int = 0,
    progress: bool = True,
    eot: int | None = None,
    save_samples: str | Path | None = None,
) -> list[ResultRow]:
    """Clean and robust zero-shot accuracy on ``data`` for every budget in ``eps_list``.

    One row per eps (``attack="none"``: one clean row at eps 0). The attack runs in fp32 unless
    ``attack_precision`` is "bf16"/"fp16" (the paper evaluates without AMP; successes are re-checked in
    fp32). ``check=False`` skips the gradient-masking checks (rows then carry ``masking_checks_skipped``).
    With ``state_dir``, the per-sample results are saved after every batch and a rerun resumes.
    ``eot`` averages the attacks' gradients over that many draws (None: only for a randomised model).
    ``save_samples``: a directory for per-sample records and adversarial images (:mod:`dvd.eval.samples`).
    """
    attacks = resolve_attacks(attack)
    model_name = model_name or getattr(model, "model_name", "model")
    dataset_name = dataset_name or data.name
    budgets = [0.0] if attack == "none" else [float(e) for e in eps_list]
    if not budgets:
        raise ConfigError("empty eps list; give at least one budget, e.g. --eps 4/255")
    if len(data.classnames) <= 2 and {"apgd-t", "fab-t"} & set(attacks):
        # a targeted attack has no other class to aim at (paper: APGD-CE only)
        attacks = tuple(a for a in attacks if a not in ("apgd-t", "fab-t")) or ("apgd-ce",)
    with evaluation_mode(model):
        classifier = ZeroShotClassifier(
            model, data.classnames, data.templates, text_batch_size=text_batch_size
        )
        fingerprint = _fingerprint(classifier)
        rows = []
        for eps in budgets:
            run = _Budget(
                classifier=classifier,
                data=data,
                eps=eps,
                attack=attack if eps > 0 else "none",
                attacks=attacks if eps > 0 else (),
                steps=steps if eps > 0 else 0,
                limit=limit,
                batch_size=batch_size,
                seed=seed,
                model_name=model_name,
                dataset_name=dataset_name,
                attack_precision=attack_precision,
                workers=workers,
                check=check,
                progress=progress,
                fingerprint=fingerprint,
                eot=eot,
                save_samples=save_samples,
            )
            rows.append(run.evaluate(state_dir))
    flag_rising_robustness(rows)
    return rows


@dataclass
class _Budget:
    """The evaluation of one (dataset, eps): batches, per-sample results, resumable state."""

    classifier: ZeroShotClassifier
    data: ZeroShotData
    eps: float
    attack: str
    attacks: tuple[str, ...]
    steps: int
    limit: int | None
    batch_size: int
    seed: int
    model_name: str
    dataset_name: str
    attack_precision: str | None
    check: bool
    workers: int
    progress: bool
    fingerprint: str
    eot: int | None = None
    save_samples: str | Path | None = None

    def _save(self, start: int, labels: torch.Tensor, clean: torch.Tensor, adversarial: Any = None,
              attack_of: Any = None, loss: Any = None, images: torch.Tensor | None = None) -> None:
        """Per-sample records (and adversarial images) for ``--save-samples``."""
        from dvd.eval.samples import classification_records, writer_for

        writer = writer_for(self.save_samples, task="zeroshot", model=self.model_name,
                            dataset=self.dataset_name, attack=self.attack, eps=self.eps)
        if writer is not None:
            names = self.classifier.classnames
            writer.write(classification_records(start, labels, clean, adversarial, attack_of, loss, names),
                         images)

    @property
    def key(self) -> dict[str, Any]:
        """Everything the per-sample results depend on; a saved state with another key is not resumed."""
        names = (
            "model_name",
            "dataset_name",
            "attack",
            "attacks",
            "eps",
            "steps",
            "seed",
            "batch_size",
            "limit",
            "attack_precision",
            "check",
            "fingerprint",
            "eot",
        )
        return {name: getattr(self, name) for name in names}

    def state_path(self, state_dir: str | Path | None) -> Path | None:
        if state_dir is None:
            return None
        return state_path(
            state_dir,
            task="zeroshot",
            model=self.model_name,
            dataset=self.dataset_name,
            attack=self.attack,
            steps=self.steps,
            eps=self.eps,
        )

    def evaluate(self, state_dir: str | Path | None) -> ResultRow:
        path = self.state_path(state_dir)
        state = load_state(path, self.key)
        clean: list[bool] = state["clean"]
        robust: list[bool] = state["robust"]
        flags: set[str] = set(state["flags"])
        if not self.check and self.eps > 0:
            flags.add("masking_checks_skipped")
        total = _total(self.data.dataset, self.limit)
        label = f"{self.dataset_name} {self.attack} eps={eps_text(self.eps)}"
        bar = tqdm(
            total=total,
            initial=state["position"],
            desc=label,
            unit="img",
            disable=not self.progress,
            file=sys.stderr,
        )
        device = self.classifier.weights.device
        if not state["finished"]:
            batches = _batches(
                self.data.dataset,
                self.batch_size,
                start=state["position"],
                limit=self.limit,
                workers=self.workers,
            )
            for position, next_position, images, labels in batches:
                tick = time.perf_counter()
                if len(labels):
                    images, labels = images.to(device), labels.to(device)
                    clean_correct, robust_correct, batch_flags = self._evaluate_batch(
                        images, labels, position
                    )
                    clean += clean_correct.tolist()
                    robust += robust_correct.tolist() if robust_correct is not None else []
                    flags.update(batch_flags)
                state.update(clean=clean, robust=robust, flags=sorted(flags), position=next_position)
                state["skipped"] += next_position - position - len(labels)
                state["seconds"] += time.perf_counter() - tick
                save_state(path, state)
                bar.update(next_position - position)
                bar.set_postfix(clean=f"{_mean(clean):.3f}", robust=f"{_mean(robust):.3f}" if robust else "-")
            # a stream drops unreadable samples itself (counted by this process's pass when workers == 0)
            dropped = getattr(self.data.dataset, "skipped_count", 0)
            state["stream_skipped"] = dropped if self.workers == 0 else 0
            state["finished"] = True
            save_state(path, state)
        bar.close()
        if not clean:
            raise ValueError(f"{self.dataset_name} yielded no samples; check the dataset directory and split")
        return ResultRow(
            model=self.model_name,
            task="zeroshot",
            dataset=self.dataset_name,
            metric="accuracy",
            attack=self.attack,
            eps=self.eps,
            steps=self.steps,
            clean=_mean(clean),
            adversarial=_mean(robust) if self.eps > 0 else None,
            n=len(clean),
            seconds=round(state["seconds"], 3),
            seed=self.seed,
            flags=sorted(flags),
            versions=versions(),
            skipped=state["skipped"] + state.get("stream_skipped", 0),
        )

    def _evaluate_batch(
        self, images: torch.Tensor, labels: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, set[str]]:
        if self.eps == 0:
            autocast = (
                torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda else contextlib.nullcontext()
            )
            with torch.no_grad(), autocast:
                predicted = self.classifier(images).argmax(dim=1)
            self._save(start, labels, predicted)
            return (predicted == labels).cpu(), None, set()
        seed = self.seed + start  # per-batch seed from the sample offset: a resumed run draws the same
        if self.attack == "pgd":
            return self._pgd(images, labels, seed, start)
        from dvd.attacks import evaluate_robustness

        result = evaluate_robustness(
            self.classifier,
            images,
            labels,
            eps=self.eps,
            norm="linf",
            attacks=self.attacks,
            steps=self.steps,
            seed=seed,
            precision=self.attack_precision,
            check=self.check,
            eot=self.eot,
        )  # scores: 0/1 per sample, or the fraction over fresh draws for a randomised model
        if self.save_samples is not None:
            with torch.no_grad():
                clean, attacked = (self.classifier(x).argmax(dim=1) for x in (images, result.adversarial))
            self._save(start, labels, clean, attacked, result.attack_of, result.loss, result.adversarial)
        return result.clean_score.cpu(), result.robust_score.cpu(), set(_flag_names(result.flags))

    def _pgd(
        self, images: torch.Tensor, labels: torch.Tensor, seed: int, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, set[str]]:
        """Plain L-inf PGD on the cross-entropy (step 2.5 eps / steps) of the clean-correct samples."""
        from dvd.attacks import cross_entropy, low_precision, pgd_attack

        with torch.no_grad():
            clean = self.classifier(images).argmax(dim=1) == labels
        robust = clean.clone()
        index = clean.nonzero()[:, 0]
        adversarial = images.clone()
        loss = torch.full((len(labels),), float("nan"), device=images.device)
        if index.numel():
            forward = low_precision(self.classifier, self.attack_precision)
            generator = torch.Generator(device=images.device).manual_seed(seed)
            found = pgd_attack(
                cross_entropy(forward, labels[index]),
                images[index],
                eps=self.eps,
                steps=self.steps,
                generator=generator,
            )
            with torch.no_grad():  # judged in fp32 whatever precision the attack ran in
                robust[index] = self.classifier(found.adversarial).argmax(dim=1) == labels[index]
            adversarial[index], loss[index] = found.adversarial, found.loss.float()
        if self.save_samples is not None:
            with torch.no_grad():
                before, after = (self.classifier(x).argmax(dim=1) for x in (images, adversarial))
            attack_of = ["pgd" if b else None for b in (clean & ~robust).tolist()]
            self._save(start, labels, before, after, attack_of, loss, adversarial)
        return clean.cpu(), robust.cpu(), {"masking_checks_skipped"}  # the checks belong to the ensemble


def cli(argv: Sequence[str]) -> int:
    """``dvd eval zeroshot``: evaluate a CLIP on zero-shot datasets, clean and under attack."""
    parser = argparse.ArgumentParser(prog="dvd eval zeroshot", description=cli.__doc__)
    parser.add_argument(
        "--model", required=True, help="open_clip name, hf-hub:org/name, config .json or checkpoint dir"
    )
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local weights file")
    parser.add_argument("--model-name", default=None, help="short name for the result rows")
    parser.add_argument(
        "--dataset",
        action="append",
        help="CLIP_benchmark wds dir, ImageFolder + classnames.txt, ShapesWorld root, wds/<name>; repeatable",
    )
    parser.add_argument("--protocol", default=None, help="a published suite: robustvlm or dvd")
    parser.add_argument("--skip-missing", action="store_true", help="--protocol: run the datasets found")
    parser.add_argument(
        "--vision-weights", default=None, help="image-tower-only checkpoint (RobustVLM's TeCoA/FARE .pt)"
    )
    parser.add_argument(
        "--dataset-root", default=None, help="root for wds/<name> ({dataset} placeholders allowed)"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--eps", default=DEFAULT_EPS, help=f"comma-separated L-inf budgets (default {DEFAULT_EPS})"
    )
    parser.add_argument("--eps-unit", default=None, help="divide --eps by this, e.g. 255")
    parser.add_argument(
        "--attack",
        default="apgd-ce",
        help="apgd-ce (default), aa (apgd-ce + apgd-t), aa-standard (+ fab-t, square), pgd, none, "
        "or a comma list of apgd-ce, apgd-t, apgd-dlr, fab-t, square",
    )
    parser.add_argument(
        "--eot", default=None, help="average gradients over N draws (default: 20 if the model is random)"
    )
    parser.add_argument(
        "--save-samples", default=None, help="directory for per-sample JSONL records + adversarial images"
    )
    parser.add_argument("--steps", default="100")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--limit", default=None, help="evaluate the first N samples of each dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", help="model weights precision (open_clip's names)")
    parser.add_argument(
        "--attack-precision", default=None, choices=("bf16", "fp16"), help="AMP inside the attack"
    )
    parser.add_argument("--workers", default="0", help="DataLoader workers")
    parser.add_argument("--out", default="results.json", help="result rows JSON (merged into if it exists)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(list(argv))
    if args.protocol is not None:
        from dvd.eval.zeroshot_protocols import run  # imports this module: deferred

        return run(args)
    if not args.dataset:
        raise ConfigError("give --dataset (repeatable) or --protocol robustvlm|dvd")
    resolve_attacks(args.attack)
    eot = None if args.eot is None else positive_int(args.eot, "--eot")
    # checked even with --attack none: a typo is a typo
    eps_list = parse_eps_list(args.eps, options.eps_unit(args.eps_unit))
    steps = positive_int(args.steps, "--steps")
    batch_size = positive_int(args.batch_size, "--batch-size")
    limit = None if args.limit is None else positive_int(args.limit, "--limit")
    workers = options.workers(args.workers)
    options.check_model_argument(args.model)
    out = claim_output(args.out)
    model_name = args.model_name or options.model_row_name(args.model, args.pretrained, args.vision_weights)
    checkpoint = options.model_checkpoint(args.model, args.pretrained, args.vision_weights)
    check_model_name(out, model_name, checkpoint)

    from dvd.data.transforms import image_transform
    from dvd.models.clip import create_clip

    torch.manual_seed(args.seed)  # a randomly initialised model (config JSON) is the same on every rerun
    model = create_clip(
        args.model,
        pretrained=args.pretrained,
        device=args.device,
        precision=args.precision,
        vision_weights=args.vision_weights,
    )
    transform = image_transform(model.image_size)
    print(
        f"{model_name}: images are resized (shortest side) and centre-cropped to the model's "
        f"{model.image_size}x{model.image_size} input",
        file=sys.stderr,
    )
    state_dir = Path(f"{out}.partial")
    all_rows: list[ResultRow] = []
    for spec in args.dataset:
        for name, data in resolve_datasets(
            spec, transform=transform, root=args.dataset_root, split=args.split
        ):
            rows = evaluate_zeroshot(
                model,
                data,
                eps_list=eps_list,
                attack=args.attack,
                steps=steps,
                limit=limit,
                batch_size=batch_size,
                seed=args.seed,
                model_name=model_name,
                dataset_name=name,
                state_dir=state_dir,
                attack_precision=args.attack_precision,
                workers=workers,
                progress=not args.no_progress,
                eot=eot,
                save_samples=args.save_samples,
            )
            write_rows(out, options.mark_rows(rows, checkpoint))
            all_rows += rows
    remove_states(state_dir, all_rows)  # every (dataset, eps) of this run is in the results file now
    print(format_table(all_rows))
    print(f"wrote {len(all_rows)} rows to {out}", file=sys.stderr)
    return 0


def resolve_datasets(
    spec: str, *, transform: Any, root: str | None = None, split: str = "test"
) -> list[tuple[str, ZeroShotData]]:
    """``(name, data)`` per dataset: a directory, a ShapesWorld root (every task) or ``wds/<name>``."""
    from dvd.data.zeroshot import load_zeroshot

    if spec.startswith("wds/"):
        name = spec[len("wds/") :]
        path = wds_path(name, root)
        return [(name, load_zeroshot(path, transform=transform, split=split))]
    path = Path(spec)
    if path.is_dir() and (path / "zeroshot").is_dir():  # a ShapesWorld root: every zero-shot task
        tasks = sorted(p for p in (path / "zeroshot").iterdir() if (p / "classnames.txt").is_file())
        if not tasks:
            raise FileNotFoundError(f"{path}/zeroshot has no task directories with classnames.txt")
        return [(f"shapesworld/{t.name}", load_zeroshot(t, transform=transform, split=split)) for t in tasks]
    if path.is_dir():
        data = load_zeroshot(path, transform=transform, split=split)
        return [(data.name, data)]
    siblings = [p.name for p in path.parent.iterdir() if p.is_dir()] if path.parent.is_dir() else []
    hint = suggest(path.name, siblings) if siblings else ""
    raise FileNotFoundError(
        f"dataset {spec!r} is not a directory{hint}; give a CLIP_benchmark webdataset dir, an ImageFolder "
        "with classnames.txt, a ShapesWorld root, or wds/<name> with --dataset-root"
    )


def wds_path(name: str, root: str | None) -> Path:
    """CLIP_benchmark style: ``--dataset-root`` with ``{dataset}``/``{dataset_cleaned}``, or a parent dir."""
    if root is None:
        raise ConfigError(
            f"wds/{name} needs --dataset-root (the directory holding the CLIP_benchmark wds dirs)"
        )
    cleaned = name.replace("/", "-")
    if "{" in root:
        candidates = [Path(root.format(dataset=name, dataset_cleaned=cleaned))]
    else:
        candidates = [Path(root) / name, Path(root) / f"wds_{cleaned}", Path(root) / cleaned]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    parent = candidates[0].parent
    known = [p.name.removeprefix("wds_") for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    hint = suggest(cleaned, known) if known else f" ({parent} does not exist)"
    raise ConfigError(f"dataset wds/{name} not found under {root}{hint}")


def _batches(
    dataset: Any, batch_size: int, *, start: int, limit: int | None, workers: int
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(position, next_position, images, labels)`` over dataset positions ``start`` to ``limit``, in order.

    A position counts every sample read, corrupt ones (None, from map-style readers) included, so a
    resumed run restarts at the right sample; corrupt samples are left out of the batch.
    """
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        samples = itertools.islice(loader, start, limit)
    else:
        end = len(dataset) if limit is None else min(limit, len(dataset))
        subset = torch.utils.data.Subset(dataset, range(start, end))
        samples = iter(torch.utils.data.DataLoader(subset, batch_size=None, num_workers=workers))
    position = start
    while True:
        chunk = list(itertools.islice(samples, batch_size))
        if not chunk:
            return
        good = [item for item in chunk if item is not None]
        images = torch.stack([image for image, _ in good]) if good else torch.empty(0)
        labels = torch.as_tensor([int(label) for _, label in good], dtype=torch.long)
        yield position, position + len(chunk), images, labels
        position += len(chunk)


def _total(dataset: Any, limit: int | None) -> int | None:
    size = len(dataset) if hasattr(dataset, "__len__") else None
    if size is None:
        return limit
    return size if limit is None else min(size, limit)


def _fingerprint(classifier: ZeroShotClassifier) -> str:
    """Identifies model + classifier for resuming: text weights and the logits of one fixed probe image."""
    size = classifier.image_size
    ramp = torch.linspace(0, 1, size * size, device=classifier.weights.device).view(1, 1, size, size)
    probe = torch.cat([ramp, ramp.flip(-1), ramp.flip(-2)], dim=1)
    with torch.no_grad():
        logits = classifier(probe).float().cpu()
    digest = hashlib.sha1(classifier.weights.float().cpu().numpy().round(4).tobytes())
    digest.update(logits.numpy().round(3).tobytes())
    return digest.hexdigest()[:16]


def _flag_names(flags: Any) -> list[str]:
    """The fired checks as names, whatever container the attack reports them in."""
    if not flags:
        return []
    if isinstance(flags, str):
        return [flags]
    if isinstance(flags, dict):
        return [str(k) for k, v in flags.items() if v]
    return [str(f) for f in flags]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients while evaluating; the caller's settings come back after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)
        model.train(was_training)


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else 0.0
