"""The demo report's figures: result plots and the example grids (clean image, each model's attacked
image and its reading)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from dvd.demo_claims import HEADLINE_EPS  # noqa: E402
from dvd.eval.report import average_rows, eps_label, plot_clean_vs_robust, plot_metric_vs_eps  # noqa: E402

Row = dict[str, Any]


def plot_results(rows: Sequence[Row], figures: Path) -> dict[str, Path]:
    """The report's plots from the result rows (each only when its rows exist), by name."""
    plots: dict[str, Path] = {}
    zeroshot = [r for r in rows if r["task"] == "zeroshot"]
    averages = average_rows(zeroshot, task="zeroshot")
    made = plot_clean_vs_robust(
        averages, figures / "zeroshot_headline.png", eps=HEADLINE_EPS, ylabel="accuracy (%)",
        title=f"zero-shot accuracy, mean of the ShapesWorld tasks: clean vs APGD {eps_label(HEADLINE_EPS)}",
    )
    if made:
        plots["headline"] = made
    made = plot_metric_vs_eps(
        averages + zeroshot, figures / "zeroshot_vs_eps.png", task="zeroshot", ylabel="accuracy (%)",
        title="zero-shot accuracy under APGD-CE, per task (eps 0 = clean)",
    )
    if made:
        plots["zeroshot"] = made
    retrieval = [r for r in rows if r["task"] == "retrieval" and r["metric"].endswith("recall@1")]
    made = plot_metric_vs_eps(
        retrieval, figures / "retrieval_vs_eps.png", task="retrieval", ylabel="recall@1 (%)",
        title="retrieval on the ShapesWorld test images and captions (images attacked)",
    )
    if made:
        plots["retrieval"] = made
    for task, ylabel in (("caption", "CIDEr"), ("vqa", "VQA accuracy (%)")):
        made = plot_metric_vs_eps(
            rows, figures / f"{task}_vs_eps.png", task=task, ylabel=ylabel,
            title=f"{task} under attack (eps 0 = clean)", scale=100.0,  # as the report's tables (CIDEr x 100)
        )
        if made:
            plots[task] = made
    return plots




def _wrap(text: str, width: int = 34) -> str:

    return "\n".join(textwrap.wrap(text, width)) or "(empty)"


def _image_grid(
    path: Path,
    images: Any,
    attacked: dict[str, Any],
    *,
    cell: tuple[float, float],
    clean_title: str,
    clean_label: Callable[[int], str],
    label: Callable[[str, int], tuple[str, str]],
    eps: float,
) -> Path:
    """Clean images in the first column, each model's attacked images in its own; ``label(name, i)``
    gives a cell's caption and its colour."""
    names = list(attacked)
    rows, cols = len(images), 1 + len(names)
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for i in range(rows):
        ax = axes[i][0]
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xlabel(clean_label(i), fontsize=8)
        if i == 0:
            ax.set_title(clean_title, fontsize=9)
        for j, name in enumerate(names, start=1):
            ax = axes[i][j]
            ax.imshow(attacked[name][i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            text, color = label(name, i)
            ax.set_xlabel(text, fontsize=8, color=color)
            if i == 0:
                ax.set_title(f"{name}\nattacked at {eps_label(eps)}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_caption_grid(
    path: Path,
    images: Any,
    references: list[str],
    captions: dict[str, tuple[Any, list[str], list[str]]],
    eps: float,
) -> Path:
    """Each VLM's caption of the clean and of its attacked image, beside the reference."""

    def label(name: str, i: int) -> tuple[str, str]:
        _, clean, attacked = captions[name]
        return f"clean: {_wrap(clean[i])}\nattacked: {_wrap(attacked[i])}", "black"

    return _image_grid(
        path, images, {name: c[0] for name, c in captions.items()}, cell=(3.4, 3.3),
        clean_title="clean image", clean_label=lambda i: "reference:\n" + _wrap(references[i]),
        label=label, eps=eps,
    )


def _describe(reading: Sequence[str], truth: Sequence[str] | None = None) -> str:
    words = []
    for i, word in enumerate(reading):
        words.append(f"{word}*" if truth is not None and word != truth[i] else word)
    return " ".join(words)


def draw_reading_grid(
    path: Path,
    images: Any,
    truth: list[list[str]],
    tasks: list[str],
    readings: dict[str, tuple[Any, list[list[str]], list[list[str]]]],
    eps: float,
) -> Path:
    """Each CLIP's zero-shot reading of every task, clean and attacked; red where the attack made the
    reading worse than the model's clean one (a * marks each wrong word)."""

    def label(name: str, i: int) -> tuple[str, str]:
        _, clean, attacked = readings[name]
        wrong = sum(a != b for a, b in zip(attacked[i], truth[i], strict=True)) > sum(
            a != b for a, b in zip(clean[i], truth[i], strict=True)
        )
        text = f"clean: {_describe(clean[i], truth[i])}\nattacked: {_describe(attacked[i], truth[i])}"
        return text, "#b03a2e" if wrong else "black"

    return _image_grid(
        path, images, {name: r[0] for name, r in readings.items()}, cell=(2.9, 2.75),
        clean_title=f"clean image\n({' / '.join(tasks)})",
        clean_label=lambda i: "truth:\n" + _describe(truth[i]), label=label, eps=eps,
    )
