"""``dvd demo --seeds 0,1,2``: the demo once per seed, each a full demo in ``OUT/seed-<s>/``, and one report
over all of them (``OUT/report.md``: the claims with each seed's value, min and max; a claim holds only if
it holds for every seed) with every seed's rows in ``OUT/results.json``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dvd.config import ConfigError
from dvd.demo_claims import (
    MARGIN_NOTE,
    SampleSource,
    check_claims,
    claims_over_seeds,
    headline,
    seeds_claims_table,
)
from dvd.demo_preset import CLIP_MODELS, DemoLayout, DemoPreset
from dvd.io import atomic_write, read_json, write_json

Row = dict[str, Any]


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> ``[0, 1, 2]``; anything else is a one-line error."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds:
        raise ConfigError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds names a seed twice: {text!r}")
    return seeds


def seed_dir(out: str | Path, seed: int) -> Path:
    """Where the demo of one seed of a multi-seed run lives: a full demo layout of its own."""
    return Path(out) / f"seed-{seed}"


def run_seeds(
    out: str | Path, seeds: Sequence[int], run_one: Callable[[Path, int], Any], preset: DemoPreset
) -> Path:
    """``run_one(folder, seed)`` for every seed (each resumable as a single demo is), then the report over
    all of them; returns its path."""
    for seed in seeds:
        run_one(seed_dir(out, seed), seed)
    return write_seeds_report(out, seeds, preset)


def write_seeds_report(out: str | Path, seeds: Sequence[int], preset: DemoPreset) -> Path:
    """``OUT/report.md`` and ``OUT/results.json`` from the seed folders' ``results.json``."""
    out = Path(out)
    per_seed: dict[int, list[Row]] = {}
    for seed in seeds:
        path = seed_dir(out, seed) / "results.json"
        per_seed[seed] = [{**r, "seed": seed} for r in read_json(path)] if path.is_file() else []
    write_json(out / "results.json", [r for rows in per_seed.values() for r in rows])
    samples = {seed: DemoLayout(seed_dir(out, seed)).sample_records for seed in seeds}
    text = render_seeds_markdown(per_seed, preset, samples)
    path = out / "report.md"
    atomic_write(path, lambda p: p.write_text(text))
    return path


def render_seeds_markdown(
    per_seed: dict[int, list[Row]], preset: DemoPreset, samples: Mapping[int, SampleSource] | None = None
) -> str:
    """The report over seeds: the claims table with the seed spread, the zero-shot headline per seed;
    ``samples``: per seed, where its VLM evaluations' per-sample records are (the gains' standard errors)."""
    seeds = list(per_seed)
    name = preset.name
    listed = ", ".join(map(str, seeds))
    lines = [
        f"# Double Visual Defense on ShapesWorld — demo report over seeds {listed}\n",
        f"`dvd demo --preset {name} --seeds {','.join(map(str, seeds))}` ran the whole demo once per seed "
        "(world, models and attacks all drawn from that seed), each in `seed-<s>/` with its own report. "
        "Every row of every seed is in `results.json` (field `seed`).\n",
        "## The paper's claims over the seeds\n",
        "Each check's value per seed, its range, and the smallest margin over the seeds; a check holds only "
        f"if it holds for every seed. {MARGIN_NOTE}\n",
        seeds_claims_table(claims_over_seeds({
            s: check_claims(rows, samples.get(s) if samples else None) for s, rows in per_seed.items()
        })),
        "## Zero-shot average per seed (clean / attacked at 4/255, %)\n",
        "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|" + "---|" * (len(seeds) + 1),
    ]
    heads = {s: headline(rows) for s, rows in per_seed.items()}
    for model in CLIP_MODELS:
        cells = []
        for s in seeds:
            v = heads[s].get(model)
            cells.append("–" if v is None else f"{100 * v['clean']:.1f} / {100 * v['adversarial']:.1f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("\n## Per seed\n")
    lines += [f"- seed {s}: [report](seed-{s}/report.md), `seed-{s}/results.json`" for s in seeds]
    return "\n".join(lines) + "\n"
