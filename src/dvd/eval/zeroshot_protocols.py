"""The published zero-shot robustness protocols as presets: ``dvd eval zeroshot --protocol NAME``.

``robustvlm``: RobustVLM's CLIP_benchmark suite (13 webdatasets), ImageNet-1k reported separately
on 5000 samples. ``dvd``: the paper's 38 datasets. Both: CLIP_benchmark's sample selection
(:mod:`dvd.data.wds_selection`), APGD-CE then APGD-T over 9 target classes (APGD-CE only for two
classes), 100 iterations each, logits = 100 x cosine, fp32 (no AMP). RobustVLM also attacks CIFAR-10/
100 and STL-10 at their native resolution, resized (bicubic) to the model's input inside the model.
The published numbers use exactly these two attacks, so the square-attack masking checks are off and
rows carry ``masking_checks_skipped``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn
from torchvision import transforms as T

from dvd.attacks.escalation import ESCALATION_QUERIES
from dvd.attacks.robustness import CHECK_QUERIES
from dvd.config import ConfigError, suggest
from dvd.data.transforms import ImageTransform, plain_tensor
from dvd.data.wds_selection import SelectedSamples, Selection
from dvd.data.zeroshot import ZeroShotData, class_label, load_zeroshot
from dvd.eval.arguments import parse_common
from dvd.eval.clip_cli import DEFAULT_EPS, create_from_args, write_marked
from dvd.eval.results import ResultRow, eps_text, read_rows, remove_states
from dvd.eval.zeroshot_classifier import resolve_attacks
from dvd.eval.zeroshot_eval import evaluate_zeroshot

VTAB = ("caltech101", "cifar10", "cifar100", "clevr_count_all", "clevr_closest_object_distance",
        "diabetic_retinopathy", "dmlab", "dsprites_label_orientation", "dsprites_label_x_position",
        "dsprites_label_y_position", "dtd", "eurosat", "kitti_closest_vehicle_distance", "flowers", "pets",
        "pcam", "resisc45", "smallnorb_label_azimuth", "smallnorb_label_elevation", "svhn")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A published suite: datasets (CLIP_benchmark names), budgets, selection and attack settings."""

    name: str
    datasets: tuple[str, ...]
    eps: tuple[float, ...]
    samples: int = 1000
    batch_size: int = 50  # the publishing run's DataLoader batch size: it decides which samples
    workers: int = 4
    separate: tuple[tuple[str, int], ...] = ()  # (dataset, samples) reported apart from the average
    native_resolution: tuple[str, ...] = ()
    steps: int = 100
    logit_scale: float = 100.0
    attack: str = "aa"


PROTOCOLS = {
    "robustvlm": Protocol(
        name="robustvlm",
        datasets=("vtab/cifar10", "stl10", "vtab/cifar100", "cars", "vtab/caltech101", "vtab/pets",
                  "vtab/flowers", "vtab/dtd", "vtab/eurosat", "fgvc_aircraft", "vtab/pcam", "imagenet-r",
                  "imagenet_sketch"),
        eps=(2 / 255, 4 / 255),
        separate=(("imagenet1k", 5000),),
        native_resolution=("vtab/cifar10", "vtab/cifar100", "stl10"),
    ),
    "dvd": Protocol(
        name="dvd",
        datasets=("imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "imagenet-o",
                  "objectnet", "fer2013", "voc2007", "voc2007_multilabel", "sun397", "cars", "fgvc_aircraft",
                  "mnist", "stl10", "gtsrb", "country211", "renderedsst2",
                  *(f"vtab/{name}" for name in VTAB)),
        eps=(4 / 255,),
        batch_size=8,
    ),
}


class ProtocolCLIP(nn.Module):
    """A DvdCLIP seen through a protocol: fixed logit scale, optional native-resolution inputs."""

    def __init__(self, model: nn.Module, *, logit_scale: float, input_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.model_name = model.model_name
        self.input_size = input_size or model.image_size
        self.register_buffer("scale", torch.tensor(float(logit_scale)), persistent=False)

    @property
    def image_size(self) -> int:
        return self.input_size

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.scale

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        size = self.model.image_size
        if images.shape[-2:] != (size, size):  # torchvision Resize(size, bicubic) on tensors
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.tokenize(texts)


def published_transform(model: nn.Module) -> T.Compose:
    """open_clip's eval preprocessing of ``model`` minus Normalize (CLIP_benchmark's ``transform_unnorm``)."""
    known = {field.name for field in dataclasses.fields(PreprocessCfg)}
    cfg = PreprocessCfg(**{k: v for k, v in model.preprocess_cfg.items() if k in known})
    steps = image_transform_v2(cfg, is_train=False).transforms
    return T.Compose([step for step in steps if not isinstance(step, T.Normalize)])


def _check_fixed_flags(args: argparse.Namespace, protocol: Protocol) -> None:
    """The preset fixes the attack; a flag that would change it is an error, not silently ignored."""
    changed = {
        "--eps": args.eps != DEFAULT_EPS,
        "--eps-unit": args.eps_unit is not None,
        "--attack": args.attack != "apgd-ce",
        "--steps": str(args.steps) != "100",
        "--attack-precision": args.attack_precision is not None,
        "--escalation-queries": str(args.escalation_queries) != str(ESCALATION_QUERIES),  # checks are off
        "--check-queries": str(args.check_queries) != str(CHECK_QUERIES),
        "--dataset": bool(args.dataset),
    }
    given = [flag for flag, differs in changed.items() if differs]
    if given:
        raise ConfigError(
            f"--protocol {protocol.name} fixes the datasets, budgets and attack; drop {', '.join(given)}"
        )


def dataset_candidates(name: str, root: str) -> list[Path]:
    """CLIP_benchmark's layout: ``root`` with ``{dataset}``/``{dataset_cleaned}``, or ``root/wds_<clean>``."""
    cleaned = name.replace("/", "-")  # wds/vtab/cifar10 -> wds_vtab-cifar10
    if "{" in root:
        return [Path(root.format(dataset=name, dataset_cleaned=cleaned))]
    return [Path(root) / f"wds_{cleaned}", Path(root) / name, Path(root) / cleaned]


def dataset_dir(name: str, root: str) -> Path | None:
    return next((c for c in dataset_candidates(name, root) if c.is_dir()), None)


def plan(protocol: Protocol, root: str, *, skip_missing: bool) -> list[tuple[str, int, Path]]:
    """``(dataset, samples, directory)`` for the whole suite; every missing dataset named up front."""
    wanted = [(name, protocol.samples) for name in protocol.datasets] + list(protocol.separate)
    found = [(name, samples, dataset_dir(name, root)) for name, samples in wanted]
    missing = [name for name, _, path in found if path is None]
    if missing and not skip_missing:
        raise ConfigError(
            f"{len(missing)} of {len(wanted)} {protocol.name} datasets are missing: {', '.join(missing)} "
            f"(e.g. looked for {dataset_candidates(missing[0], root)[0]}); download them with "
            "CLIP_benchmark, or pass --skip-missing to evaluate the others"
        )
    for name in missing:
        print(f"dvd: skipping {name}: not found under {root}", file=sys.stderr)
    suite = []
    for name, samples, path in found:
        kind = _dataset_type(path) if path is not None else "classification"
        if kind != "classification":  # e.g. voc2007_multilabel: mAP, no single label to attack
            note = f"dvd: skipping {name}: a CLIP_benchmark {kind} dataset, not classification"
            print(note, file=sys.stderr)
        elif path is not None:
            suite.append((name, samples, path))
    return suite


def _dataset_type(path: Path) -> str:
    """CLIP_benchmark's ``dataset_type.txt`` (classification when absent or empty)."""
    kind_file = path / "dataset_type.txt"
    kind = kind_file.read_text(errors="replace").strip().lower() if kind_file.is_file() else ""
    return kind or "classification"


def load_selected(
    path: Path, protocol: Protocol, *, samples: int, seed: int, transform: ImageTransform
) -> ZeroShotData:
    """The dataset at ``path`` reduced to the protocol's samples, in CLIP_benchmark's order."""
    data = load_zeroshot(path, transform=transform, split="test")
    selection = Selection(samples, seed=seed, batch_size=protocol.batch_size, workers=protocol.workers)
    if data.layout == "webdataset":
        target = lambda sample: class_label(sample, len(data.classnames))  # noqa: E731
        subset = SelectedSamples(data.dataset.urls, selection, transform=transform, target=target)
    else:  # an ImageFolder (e.g. ImageNet val): a seeded random subset, dvd's own choice
        order = torch.randperm(len(data.dataset), generator=torch.Generator().manual_seed(seed))
        subset = torch.utils.data.Subset(data.dataset, order[:samples].tolist())
    return dataclasses.replace(data, dataset=subset)


def run(args: argparse.Namespace) -> int:
    """``dvd eval zeroshot --protocol NAME``: the whole suite, resumable per dataset, table + CSV."""
    if args.protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {args.protocol!r}{suggest(args.protocol, PROTOCOLS)}")
    protocol = PROTOCOLS[args.protocol]
    if args.dataset_root is None:
        raise ConfigError(f"--protocol {protocol.name} needs --dataset-root (CLIP_benchmark wds_* dirs)")
    _check_fixed_flags(args, protocol)
    # the fixed flags hold their defaults: the common options give the run's spec, the protocol its attack
    common = parse_common(args, kind="CLIP", check_attack=resolve_attacks)
    spec = common.spec.replace(eps_list=protocol.eps, attack=protocol.attack, steps=protocol.steps)
    suite = plan(protocol, args.dataset_root, skip_missing=args.skip_missing)  # before loading a model
    model = create_from_args(args)
    rows: list[ResultRow] = []
    for name, samples, path in suite:
        done = _finished_rows(common.out, spec.model_name, name, protocol, spec.limit)
        if done:
            print(f"{name}: already in {common.out}, skipped", file=sys.stderr)
            rows += done
            continue
        native = name in protocol.native_resolution
        transform = plain_tensor() if native else published_transform(model)
        data = load_selected(path, protocol, samples=samples, seed=args.seed, transform=transform)
        first = data.dataset[0] if native and len(data.dataset) else None
        input_size = first[0].shape[-1] if first is not None else None
        view = ProtocolCLIP(model, logit_scale=protocol.logit_scale, input_size=input_size)
        found = evaluate_zeroshot(view, data, spec.replace(dataset_name=name), check=False)
        write_marked(common.out, found, common.checkpoint)
        remove_states(common.state_dir, found)  # resumable per dataset
        rows += found
    table = paper_table(rows, protocol)
    print(format_paper_table(table))
    csv_path = common.out.with_suffix(".csv")
    write_csv(csv_path, table)
    print(f"wrote {len(rows)} rows to {common.out} and the table to {csv_path}", file=sys.stderr)
    return 0


def _finished_rows(
    out: Path, model: str, dataset: str, protocol: Protocol, limit: int | None
) -> list[ResultRow]:
    """This dataset's rows if a previous run already wrote every budget of it (resume per dataset)."""
    if not out.is_file():
        return []
    rows = [
        r
        for r in read_rows(out)
        if r.model == model and r.dataset == dataset and r.task == "zeroshot" and r.attack == protocol.attack
        and r.steps == protocol.steps and (limit is None or r.n <= limit)
    ]
    by_eps = {eps_text(r.eps): r for r in rows}
    wanted = [eps_text(e) for e in protocol.eps]
    return [by_eps[e] for e in wanted] if all(e in by_eps for e in wanted) else []


def paper_table(rows: Sequence[ResultRow], protocol: Protocol) -> list[list[str]]:
    """The papers' layout: a row per dataset (n, clean, each eps; in %), the average, then separate ones."""
    by_dataset: dict[str, dict[str, ResultRow]] = {}
    for row in rows:
        by_dataset.setdefault(row.dataset, {})[eps_text(row.eps)] = row

    def numbers(name: str) -> list[float | None]:
        cells = by_dataset[name]
        clean = next(iter(cells.values())).clean
        return [clean] + [cells[e].adversarial if e in cells else None for e in map(eps_text, protocol.eps)]

    def line(name: str, values: Sequence[float | None], n: str) -> list[str]:
        return [name, n, *(_percent(v) for v in values)]

    lines = [["dataset", "n", "clean", *(eps_text(e) for e in protocol.eps)]]
    averaged = [name for name in protocol.datasets if name in by_dataset]
    for name in averaged:
        lines.append(line(name, numbers(name), str(next(iter(by_dataset[name].values())).n)))
    if averaged:
        columns = list(zip(*(numbers(name) for name in averaged), strict=True))
        means = [_mean([v for v in column if v is not None]) for column in columns]
        lines.append(line(f"average ({len(averaged)})", means, ""))
    for name, _ in protocol.separate:
        if name in by_dataset:
            lines.append(line(name, numbers(name), str(next(iter(by_dataset[name].values())).n)))
    return lines


def format_paper_table(lines: Sequence[Sequence[str]]) -> str:
    """Fixed-width text: names left-aligned, numbers right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def cell(index: int, value: str) -> str:
        return value.ljust(widths[index]) if index == 0 else value.rjust(widths[index])

    text = ["  ".join(cell(i, value) for i, value in enumerate(line)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def write_csv(path: Path, lines: Sequence[Sequence[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(lines)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
