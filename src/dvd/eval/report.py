"""Result rows -> markdown tables and PNG plots. Reads nothing but result rows (dvd.eval.results)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def eps_label(eps: float) -> str:
    """4/255-style label for a pixel budget (the unit papers use)."""
    if eps == 0:
        return "clean"
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-3 else f"{eps:.4f}"


def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "–"
    if metric in ("cider",):
        return f"{100 * value:.1f}" if value <= 10 else f"{value:.1f}"
    return f"{100 * value:.1f}"


def markdown_table(rows: Iterable[Row], *, task: str | None = None) -> str:
    """One line per model x dataset x metric: clean, then the adversarial metric per eps.

    Accuracy-like metrics are shown in percent; CIDEr is shown x100 as in the captioning papers.
    """
    rows = [r for r in rows if task is None or r["task"] == task]
    if not rows:
        return ""
    budgets = sorted({float(r["eps"]) for r in rows if float(r["eps"]) > 0})
    cells: dict[tuple[str, str, str, str], dict[str, Any]] = defaultdict(dict)
    for r in rows:
        key = (r["model"], r["dataset"], r["metric"], r.get("attack") or "")
        entry = cells[key]
        entry.setdefault("clean", r.get("clean"))
        if float(r["eps"]) > 0:
            entry[eps_label(float(r["eps"]))] = r.get("adversarial")
    header = ["model", "dataset", "metric", "attack", "clean"] + [eps_label(e) for e in budgets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, dataset, metric, attack), entry in sorted(cells.items()):
        values = [_fmt(entry.get("clean"), metric)] + [_fmt(entry.get(eps_label(e)), metric) for e in budgets]
        lines.append("| " + " | ".join([model, dataset, metric, attack or "–", *values]) + " |")
    return "\n".join(lines)


def plot_metric_vs_eps(
    rows: Sequence[Row], path: str | Path, *, task: str, title: str, ylabel: str, scale: float = 100.0
) -> Path | None:
    """One panel per dataset: the metric against eps (clean at eps 0), one line per model."""
    import matplotlib  # deferred: plotting is optional and matplotlib slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["task"] == task]
    if not rows:
        return None
    datasets = sorted({r["dataset"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = min(len(datasets), 4)
    nrows = (len(datasets) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False, sharey=True)
    for ax, dataset in zip(axes.flat, datasets, strict=False):
        for model in models:
            sel = [r for r in rows if r["dataset"] == dataset and r["model"] == model]
            if not sel:
                continue
            points = {0.0: sel[0]["clean"]}
            for r in sel:
                if float(r["eps"]) > 0 and r.get("adversarial") is not None:
                    points[float(r["eps"])] = r["adversarial"]
            xs = sorted(points)
            ax.plot([x * 255 for x in xs], [scale * points[x] for x in xs], marker="o", label=model)
        ax.set_title(dataset, fontsize=10)
        ax.set_xlabel("eps (x/255)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(datasets) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(title)
    fig.tight_layout()
    # the legend sits under the panels, so it never covers the title or a curve
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(models), 6),
               frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def average_rows(rows: Iterable[Row], *, task: str, dataset: str = "average") -> list[Row]:
    """Per model x metric x attack x eps: the mean over datasets of ``clean`` and ``adversarial``.

    Only model/metric groups evaluated on the same set of datasets at every eps are averaged, so a
    missing dataset never makes one model's mean easier than another's.
    """
    groups: dict[tuple[str, str, str], dict[float, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["task"] == task and r["dataset"] != dataset:
            groups[(r["model"], r["metric"], r.get("attack") or "")][float(r["eps"])].append(r)
    averaged = []
    for (model, metric, attack), by_eps in groups.items():
        datasets = {frozenset(r["dataset"] for r in sel) for sel in by_eps.values()}
        if len(datasets) != 1:
            continue
        for eps, sel in sorted(by_eps.items()):
            adversarial = [r["adversarial"] for r in sel if r.get("adversarial") is not None]
            robust = sum(adversarial) / len(adversarial) if len(adversarial) == len(sel) else None
            averaged.append(
                {
                    "model": model,
                    "task": task,
                    "dataset": dataset,
                    "metric": metric,
                    "attack": attack,
                    "eps": eps,
                    "steps": sel[0].get("steps"),
                    "clean": sum(r["clean"] for r in sel) / len(sel),
                    "adversarial": robust,
                    "n": sum(int(r.get("n") or 0) for r in sel),
                }
            )
    return averaged


def plot_clean_vs_robust(
    rows: Sequence[Row], path: str | Path, *, eps: float, title: str, ylabel: str, scale: float = 100.0
) -> Path | None:
    """Grouped bars per model: the clean metric and the metric under attack at ``eps`` (given rows)."""
    import matplotlib  # deferred: plotting is optional and matplotlib slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if abs(float(r["eps"]) - eps) < 1e-9 and r.get("adversarial") is not None]
    if not chosen:
        return None
    models = list(dict.fromkeys(r["model"] for r in chosen))
    clean = [scale * next(r["clean"] for r in chosen if r["model"] == m) for m in models]
    robust = [scale * next(r["adversarial"] for r in chosen if r["model"] == m) for m in models]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(models), 3.4))
    xs = range(len(models))
    width = 0.38
    bars_clean = ax.bar([x - width / 2 for x in xs], clean, width, label="clean", color="#9db4d0")
    bars_robust = ax.bar([x + width / 2 for x in xs], robust, width, label=f"attacked ({eps_label(eps)})",
                         color="#c0392b")
    for bars in (bars_clean, bars_robust):
        for bar in bars:
            top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
            ax.annotate(f"{bar.get_height():.0f}", top, ha="center", va="bottom", fontsize=8, xytext=(0, 1),
                        textcoords="offset points")
    ax.set_xticks(list(xs), models)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(clean + robust + [1.0]) * 1.15)
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
