"""The demo's ``report.md``: set-up, headline numbers against the paper's claims, tables, plots, examples.

Reads only the demo folder: ``results.json`` (the rows of :mod:`dvd.eval.results`), ``stages.json``
(time per stage), ``demo.json`` (the preset) and the trained models (for the example grids, which
attack a few test images of ShapesWorld itself).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from dvd.demo_claims import LEARNABLE, MARGIN_NOTE, SampleSource, check_claims, claims_table, headline
from dvd.demo_examples import draw_example_grid
from dvd.demo_figures import plot_results
from dvd.demo_preset import VISION_TOWER, VLM_EVALS, VLM_MODELS, DemoPreset, ReportInputs
from dvd.eval.report import (
    average_rows,
    markdown_table,
)
from dvd.eval.vlm_objective import resolve_precision
from dvd.io import atomic_write, read_json
from dvd.train.precision import auto_precision, native_precision
from dvd.train.vlm_config import VlmTrainConfig

Row = dict[str, Any]
# the report's VLM tables keep to these (results.json has every metric)
SHOWN_METRICS = {"pope": ("f1", "yes_ratio"), "targeted": ("success_rate",)}
CLIP_LABELS = {
    "clean-clip": "clean CLIP (from scratch)",
    "delta-clip": "ΔCLIP (adversarial pre-training from scratch)",
    "tecoa": "TeCoA (adversarial fine-tuning of the clean CLIP, supervised)",
    "fare": "FARE (adversarial fine-tuning of the clean CLIP, unsupervised)",
    "clean-llava": "clean LLaVA (clean CLIP tower, clean instruction tuning)",
    "fare-llava": "LLaVA on the FARE tower, clean instruction tuning (the prior art)",
    "delta-llava": "LLaVA on the ΔCLIP tower, clean instruction tuning (single defence)",
    "delta2-llava": "Δ²LLaVA (ΔCLIP tower, adversarial instruction tuning)",
}


def write_report(inputs: ReportInputs, results: str | Path) -> Path:
    """Write ``OUT/report.md`` and its PNGs from the demo folder; returns the report's path."""
    out = inputs.layout.out
    # the zero-shot ``average`` rows of results.json are recomputed where shown
    rows: list[Row] = [r for r in read_json(results) if r["dataset"] != "average"]
    stages = read_json(out / "stages.json") if (out / "stages.json").is_file() else {}
    figures = inputs.layout.figures
    figures.mkdir(parents=True, exist_ok=True)
    plots = plot_results(rows, figures)
    examples = _examples(inputs, "clip", stages)
    vlm_examples = _examples(inputs, "vlm", stages)
    text = render_markdown(inputs, rows, stages, plots, examples, vlm_examples)
    path = out / "report.md"
    atomic_write(path, lambda p: p.write_text(text))
    return path


def _examples(inputs: ReportInputs, half: str, stages: dict[str, Any]) -> Path | None:
    """The example grid of the CLIPs or the VLMs: as its demo stage drew it, else drawn now (a folder whose
    stages did not draw it); None without the trained models (a partial demo, or the VLM half not run)."""
    path = inputs.layout.example_grid(half)
    if path.is_file() and stages.get(f"examples {half}", {}).get("status") == "done":
        return path
    try:
        return draw_example_grid(inputs, half)
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# the markdown


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def render_markdown(
    inputs: ReportInputs,
    rows: Sequence[Row],
    stages: dict[str, dict[str, Any]],
    plots: dict[str, Path],
    examples: Path | None,
    vlm_examples: Path | None = None,
) -> str:
    """The report's text (plots are referenced relative to the report)."""
    p = inputs.preset
    lines: list[str] = []
    add = lines.append
    models = list(dict.fromkeys(r["model"] for r in rows))
    add("# Double Visual Defense on ShapesWorld — demo report\n")
    add(
        f"`dvd demo --preset {p.name}` trained {len([m for m in models if m in CLIP_LABELS])} models on "
        f"ShapesWorld, a procedurally generated image-text world ({p.world.image_size} px images of coloured "
        "shapes with captions), and attacked each of them with the same attacks. Everything below was "
        "measured in this run; the numbers are small-world numbers, not the paper's ImageNet/COCO ones.\n"
    )
    head = headline(rows)
    add("## Headline\n")
    add(_headline_text(head))
    if "headline" in plots:
        add(f"![clean vs attacked zero-shot accuracy]({_rel(plots['headline'], inputs.layout.out)})\n")
    add("## The paper's claims, checked on the small world\n")
    add(_claims_text(rows, inputs.layout.sample_records))
    add("## Zero-shot classification\n")
    add(
        f"Five tasks (which colour / shape / how many / what size / which texture), {p.zeroshot.limit} "
        "test images each, text classifier from class names × templates. Attack: "
        f"{p.zeroshot.attack.upper()} with {p.zeroshot.steps} steps, L∞ eps {', '.join(p.eps)} (the "
        "paper's protocol, minus APGD-T), then a gradient-free check (a Square Attack of "
        f"{p.zeroshot.check_queries} queries on the samples APGD left standing); when a gradient-masking "
        f"check fires, a Square Attack with {p.zeroshot.escalation_queries} queries runs on the survivors. "
        "Samples either Square run breaks count as broken. Accuracy in %.\n"
    )
    zeroshot = [r for r in rows if r["task"] == "zeroshot"]
    add(markdown_table(_ordered(average_rows(zeroshot, task="zeroshot") + zeroshot)) + "\n")
    if "zeroshot" in plots:
        add(f"![zero-shot accuracy vs eps]({_rel(plots['zeroshot'], inputs.layout.out)})\n")
    retrieval = [r for r in rows if r["task"] == "retrieval"]
    if retrieval:
        add("## Retrieval\n")
        add(
            f"Image→text and text→image recall on the held-out test images and their captions; the images "
            f"are attacked (APGD, {p.retrieval.steps} steps). Recall in %.\n"
        )
        add(markdown_table(_ordered([r for r in retrieval if r["metric"].endswith("recall@1")])) + "\n")
        if "retrieval" in plots:
            add(f"![retrieval vs eps]({_rel(plots['retrieval'], inputs.layout.out)})\n")
    add(_vlm_section(inputs, rows, plots))
    add("## Examples\n")
    if examples is not None:
        add(
            "Test images (left, with the truth), then each CLIP's own worst-case image at 4/255 (APGD on "
            f"the sum of its five zero-shot losses, {p.example_steps} steps). Under each image: the model's "
            "zero-shot reading of all five attributes, clean (top) and attacked (bottom); attributes it "
            "gets wrong are marked with `*`; red text: the attack made the reading worse. No pixel moves "
            "by more than 4/255: enlarged 8x, a faint texture shows on flat backgrounds, and nothing a "
            "person would read differently.\n"
        )
        add(f"![examples]({_rel(examples, inputs.layout.out)})\n")
    else:
        add("No example grid: the models of this demo folder are not all trained yet.\n")
    if vlm_examples is not None:
        add(
            "The same test images captioned by each VLM: clean, then each model's own worst case at "
            f"4/255 (APGD on the NLL of the image's reference caption, {p.example_steps} steps).\n"
        )
        add(f"![VLM examples]({_rel(vlm_examples, inputs.layout.out)})\n")
    add(_setup_text(inputs, stages))
    return "\n".join(lines) + "\n"


def _ordered(rows: Sequence[Row]) -> list[Row]:
    order = {m: i for i, m in enumerate(CLIP_LABELS)}
    return sorted(rows, key=lambda r: (order.get(r["model"], 99), r["dataset"] != "average"))


def _headline_text(head: dict[str, dict[str, float]]) -> str:
    if not head:
        return "No zero-shot results at 4/255 yet.\n"
    lines = [
        "Zero-shot accuracy averaged over the five ShapesWorld tasks, clean and under APGD at 4/255:\n",
        "| model | what it is | clean | attacked 4/255 |",
        "|---|---|---|---|",
    ]
    for model in [m for m in CLIP_LABELS if m in head] + [m for m in head if m not in CLIP_LABELS]:
        v = head[model]
        lines.append(
            f"| {model} | {CLIP_LABELS.get(model, '')} | {_pct(v['clean'])} | {_pct(v['adversarial'])} |"
        )
    return "\n".join(lines) + "\n"


def _claims_text(rows: Sequence[Row], samples: SampleSource | None = None) -> str:
    checks = check_claims(rows, samples)
    if all(c.measured is None for c in checks):
        return "Not enough results yet to compare with the paper.\n"
    return (
        "Issue 17's five claims, each checked against a target (the paper's effect, scaled to the small "
        "world): 1. ΔCLIP vs the clean CLIP, 2. vs adversarial fine-tuning (TeCoA / FARE), 3. Δ²LLaVA vs "
        "the prior art (LLaVA's recipe on the FARE tower), 4. double vs single defence (Δ²LLaVA vs LLaVA "
        "clean-tuned on ΔCLIP), 5. the undefended LLaVA as reference; then the world's own check (`world`): "
        f"every zero-shot task learnable, the clean CLIP ≥ chance + {LEARNABLE:g} pt clean (a task below it "
        "shows no model's robustness: every attacked accuracy there sits near chance). "
        + MARGIN_NOTE + "\n\n"
        + claims_table(checks)
        + "\nThe paper: an undefended CLIP falls to ~0% at 4/255, ΔCLIP is ~20 pt ahead of TeCoA / FARE, "
        "Δ²LLaVA ~30% better in attacked captioning and ~20% in attacked VQA than LLaVA on those towers.\n"
    )


def _vlm_section(inputs: ReportInputs, rows: Sequence[Row], plots: dict[str, Path]) -> str:
    vlm_rows = [r for r in rows if r["task"] in VLM_EVALS]
    lines = ["## Vision-language models (LLaVA on four towers)\n"]
    if not vlm_rows:
        if not inputs.include_vlm:
            lines.append(
                "**Not run**: the LLaVA half of the demo (`dvd train vlm`) was switched off (`--no-vlm`), "
                f"so {', '.join(VLM_MODELS)} were not trained. Nothing in this report is about VLMs.\n"
            )
        else:
            ledger = inputs.layout.out / "stages.json"
            stages = read_json(ledger) if ledger.is_file() else {}
            failed = [n for n, i in stages.items() if "llava" in n and i.get("status") == "failed"]
            trained = [
                n
                for n, i in stages.items()
                if "llava" in n and n.startswith("train") and i.get("status") == "done"
            ]
            lines.append(
                "**No VLM results**"
                + (
                    f": the VLM stages {', '.join(f'`{n}`' for n in failed)} failed (see Set-up)"
                    if failed
                    else ""
                )
                + (f"; trained: {', '.join(f'`{n}`' for n in trained)}" if trained else "")
                + ".\n"
            )
        return "\n".join(lines)
    p = inputs.preset
    lines.append(
        f"A tiny LLaVA (vision tower → MLP projector → 2-layer Llama{_shared_lm(p)}) trained in LLaVA's two "
        "stages with the same recipe on four towers: clean-llava (clean CLIP), fare-llava (FARE: the prior "
        f"art), delta-llava (ΔCLIP) and delta2-llava (Δ²LLaVA: {_delta2_recipe(p)}), "
        f"{_precision_text(p.vlm_common, inputs.device, inputs.layout.stage_config('delta2-llava-stage2'))}. "
        "Evaluated on held-out images: "
        f"{_samples(vlm_rows, 'caption', p.vlm_eval.limit)} for captioning (the world's test split), "
        f"{_samples(vlm_rows, 'vqa', p.vlm_eval.questions())} VQA questions; captioning and VQA attacked by "
        f"{_vlm_attack_text(p, inputs.device)}, {p.vlm_eval.steps} steps each; targeted attacks on "
        f"{p.targeted.limit} images with {p.targeted.steps} steps; ScienceQA on {p.scienceqa.limit} image "
        f"and {p.scienceqa.limit} text-only questions (APGD {p.scienceqa.steps} steps on the correct "
        f"letter's NLL); MME on {mme_scope(p.mme_images)}.\n"
    )
    titles = {
        "caption": "Captioning (CIDEr)",
        "vqa": "VQA accuracy (%)",
        "pope": "POPE hallucination (F1 and yes-ratio in %, clean images)",
        "targeted": "Targeted attacks (success rate in %, lower is better; clean = without attack)",
        "scienceqa": "ScienceQA accuracy (%, all questions and the image subset; text-only ones are not "
        "attacked)",
    }
    for task, title in titles.items():
        sel = [
            r
            for r in vlm_rows
            if r["task"] == task and r["metric"] in SHOWN_METRICS.get(task, (r["metric"],))
        ]
        if sel:
            lines.append(f"### {title}\n")
            lines.append(markdown_table(_ordered(sel)) + "\n")
            if task in plots:
                lines.append(f"![{task} vs eps]({_rel(plots[task], inputs.layout.out)})\n")
            if task == "pope":
                lines.extend(_pope_notes(rows))
            if task == "scienceqa":
                lines.extend(_scienceqa_notes(rows))
            if task == "targeted":
                lines.extend(_targeted_notes(rows, p))
    mme = mme_table(vlm_rows)
    if mme:
        lines.append("### MME (clean)\n")
        lines.append(
            "Per subtask: accuracy over questions and acc+ over images (both of its two questions right), "
            "in %; perception and cognition: the sums of their subtasks' scores (score = accuracy + acc+, "
            "each in %; ShapesWorld writes perception subtasks only, so cognition is –).\n"
        )
        lines.append(mme)
        lines.extend(_mme_notes(rows))
    return "\n".join(lines)


def _scienceqa_notes(rows: Sequence[Row]) -> list[str]:
    """A line when VLMs score below guessing on ScienceQA: they do not answer with an option letter."""
    chance = 1 / 3  # the world's questions have 2-3 options
    low = [r["model"] for r in rows if r["task"] == "scienceqa" and r["metric"] == "accuracy"
           and r["clean"] < chance]
    if not low:
        return []
    return [
        f"- **{', '.join(low)} score below guessing on ScienceQA** (clean, chance ≥ 33%): they do not answer "
        "with an option letter. The world's instruction data has no multiple-choice questions (LLaVA-1.5's "
        "mix has them, with this prompt), so at this scale these rows measure the format, not reasoning.\n"
    ]


def _mme_notes(rows: Sequence[Row]) -> list[str]:
    """A line for the VLMs that give both questions of every MME image the same answer, and one for those
    that never answer an MME question right (their replies are neither "yes" nor "no")."""
    same, never = [], []
    for model in VLM_MODELS:
        mine = [r for r in rows if r["model"] == model and r["task"] == "mme"]
        plus = [r["clean"] for r in mine if r["metric"] == "acc_plus"]
        accuracy = [r["clean"] for r in mine if r["metric"] == "accuracy"]
        if accuracy and max(accuracy) == 0:
            never.append(model)
        elif plus and max(plus) == 0 and all(abs(a - 0.5) < 1e-9 for a in accuracy):
            same.append(model)
    prompt = "MME's \"Please answer yes or no.\" prompt, which the world's instruction data does not use"
    notes = []
    if same:
        notes.append(
            f"- **{', '.join(same)} answer both questions of every MME image alike** (accuracy 50%, acc+ 0 "
            f"in every subtask): one always-yes or always-no reply to {prompt}; the scores measure nothing "
            "at this scale.\n"
        )
    if never:
        notes.append(
            f"- **{', '.join(never)} answer no MME question right** (accuracy 0 in every subtask): their "
            f"replies to {prompt}, say neither yes nor no; the scores measure the format, not perception.\n"
        )
    return notes


def _targeted_notes(rows: Sequence[Row], preset: DemoPreset) -> list[str]:
    """A line when no targeted attack succeeded on any VLM: the rows then do not rank the models."""
    rates = [r["adversarial"] for r in rows if r["task"] == "targeted" and r["metric"] == "success_rate"]
    if not rates or max(rates) > 0:
        return []
    return [
        f"- **No targeted attack succeeded on any VLM**: none of the {preset.targeted.limit} captions per "
        f"model became the target within {preset.targeted.steps} APGD steps at 4/255 (the paper's protocol "
        "runs 10,000 steps per image; `dvd eval targeted --steps` sets it). At this budget these rows do not "
        "rank the models.\n"
    ]


def mme_table(rows: Sequence[Row]) -> str:
    """One line per VLM: the perception and cognition scores, then accuracy / acc+ per subtask."""
    mme = [r for r in rows if r["task"] == "mme"]
    subtasks = sorted({r["dataset"].rsplit("/", 1)[1] for r in mme if r["metric"] == "acc_plus"})
    if not mme:
        return ""
    header = ["model", "perception", "cognition", *(f"{s} acc / acc+" for s in subtasks)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in [m for m in VLM_MODELS if any(r["model"] == m for r in mme)]:
        mine = [r for r in mme if r["model"] == model]
        value = {(r["dataset"].rsplit("/", 1)[-1], r["metric"]): r["clean"] for r in mine}
        totals = [value.get(("mme", t)) for t in ("perception", "cognition")]
        cells = ["–" if v is None else f"{v:.1f}" for v in totals]
        for sub in subtasks:
            cells.append(f"{_pct(value.get((sub, 'accuracy')))} / {_pct(value.get((sub, 'acc_plus')))}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pope_notes(rows: Sequence[Row]) -> list[str]:
    """A line for each VLM whose POPE answers are (nearly) all one word: its F1 measures nothing."""
    def select(model: str, task: str, pick: Callable[[Row], bool]) -> list[Row]:
        return [r for r in rows if r["model"] == model and r["task"] == task and pick(r)]

    notes = []
    for name, tower in VISION_TOWER.items():
        ratios = [r["clean"] for r in select(name, "pope", lambda r: r["metric"] == "yes_ratio")]
        if not ratios or 0.05 < max(ratios) and min(ratios) < 0.95:
            continue
        word = "no" if max(ratios) <= 0.05 else "yes"
        shape = select(tower, "zeroshot", lambda r: r["dataset"].endswith("/shape"))
        seen = ""
        if shape:
            seen = f" ({tower}'s zero-shot shape accuracy {_pct(shape[0]['clean'])}%, chance 12.5%)"
        low, high = _pct(min(ratios)), _pct(max(ratios))
        spread = low if low == high else f"{low}–{high}"
        notes.append(
            f"- **{name} answers \"{word}\" to (nearly) every presence question** (yes-ratio {spread}%): "
            f"POPE asks which shapes are in the image, and its vision tower does not tell the shapes "
            f"apart{seen}. Its F1 says nothing about hallucination at this scale."
        )
    return ["\n".join(notes) + "\n"] if notes else []


def _setup_text(inputs: ReportInputs, stages: dict[str, dict[str, Any]]) -> str:
    p = inputs.preset
    lines = ["## Set-up\n"]
    lines.append(
        f"- Preset `{p.name}`, seed {p.seed}, device `{inputs.device}`. ShapesWorld: {p.world.size} "
        f"pre-training pairs, {p.world.image_size} px, {p.world.eval_size} held-out images (a fifth of them "
        f"the caption validation split, the rest its test split) and as many test images per zero-shot task, "
        f"{p.world.instruct_size} instruction images (the evaluations' limits are below)."
    )
    common = p.clip_common
    desc = f"`{common.get('model')}` ({p.world.image_size} px)"
    if p.clip_model_config is not None:
        v, t = p.clip_model_config["vision_cfg"], p.clip_model_config["text_cfg"]
        desc = (
            f"`configs/{p.clip_model_name}.json` (ViT {v['image_size']} px, patch {v['patch_size']}, "
            f"{v['layers']} layers x {v['width']}; text {t['layers']} layers x {t['width']}; "
            f"embedding {p.clip_model_config['embed_dim']})"
        )
    lines.append(
        f"- CLIPs: {desc}, batch {common.get('batch_size')}, AdamW + cosine schedule, "
        f"{_precision_text(common, inputs.device, inputs.layout.stage_config('delta-clip'))}. Per model "
        "(`dvd train clip` settings; the full configs are in `configs/`):"
    )
    for name, cfg in p.clip_recipes.items():
        keys = (
            "recipe",
            "steps",
            "lr",
            "eps",
            "attack_steps",
            "attack_step_size",
            "eps_warmup_steps",
            "task",
        )
        lines.append(f"  - {name}: " + ", ".join(f"{k} {cfg[k]}" for k in keys if k in cfg))
    lines.append(
        f"- Attacks at evaluation: zero-shot {p.zeroshot.attack.upper()} {p.zeroshot.steps} steps on "
        f"{p.zeroshot.limit} images per task (a Square check of {p.zeroshot.check_queries} queries on APGD's "
        f"survivors; Square {p.zeroshot.escalation_queries} queries where a masking check fires); retrieval "
        f"APGD {p.retrieval.steps} steps on {p.retrieval.limit} images; "
        f"L∞ eps {', '.join(p.eps)}, images in [0, 1] (normalisation inside the model)."
    )
    lines.append(
        "\nTime per stage, in the order the stages were first taken up, from the run that finished it: wall "
        "clock, CPU time of the process that ran it (all its threads; on an otherwise idle machine wall ≈ "
        "CPU with `--threads 1`) and the machine's 1-minute load average when the stage ended (`reused` = "
        "finished by an earlier run). With `--jobs N`, N worker processes take up the stages side by side, "
        "each stage as soon as the ones it reads are done; `worker` says which ran it.\n"
    )
    lines.append("| stage | worker | wall s | CPU s | load |")
    lines.append("|---|---|---|---|---|")
    cpu_total, worker_wall = 0.0, {}
    for name, info in stages.items():
        if name == "report":
            continue
        worker = str(info.get("worker", "–"))
        seconds, cpu, load = info.get("seconds"), info.get("cpu_seconds"), info.get("load")
        if info.get("status") == "failed":
            cells = ["**failed**", "", ""]
        elif info.get("status") != "done":
            cells = ["not finished", "", ""]
        elif seconds is None:
            cells = ["reused", "", ""]
        else:
            worker_wall[worker] = worker_wall.get(worker, 0.0) + float(seconds)
            cpu_total += float(cpu or 0.0)
            cells = [
                f"{seconds:.0f}",
                "–" if cpu is None else f"{cpu:.0f}",
                "–" if load is None else f"{load:.1f}",
            ]
        lines.append(f"| {name} | {worker} | " + " | ".join(cells) + " |")
    lines.append(f"| **all stages** | | | **{cpu_total:.0f}** | |\n")
    failed = {n: i.get("error", "") for n, i in stages.items() if i.get("status") == "failed"}
    if failed:
        lines.append(
            "Stages that failed in this run (their results are missing above; rerun the demo to retry):\n"
        )
        lines += [f"- `{name}`: {error}" for name, error in failed.items()]
        lines.append("")
    elapsed = _elapsed(stages)
    outside = "outside the workers (the world, and stages run in turn)"
    busy = ", ".join(
        f"{outside if w == '–' else f'worker {w}'} {t:.0f} s"
        for w, t in sorted(worker_wall.items(), key=lambda item: (item[0] != "–", item[0]))
    )
    span = ""
    if elapsed is not None:
        seconds, earlier = elapsed
        span = f"; first stage start to last stage end: **{seconds / 60:.1f} min**"
        if earlier:
            span += f" (the last run alone; {earlier} stages were finished by earlier runs)"
    lines.append(f"Busy wall time: {busy or 'none recorded'}{span}.\n")
    lines.append(
        f"Reproduce: `dvd demo --out {inputs.layout.out} --preset {p.name}` (a re-run reuses finished "
        f"stages). All result rows: `results.json`; stage configs: `configs/`.\n"
    )
    return "\n".join(lines)


def _precision_text(settings: dict[str, Any], device: str, written: Path | None = None) -> str:
    """How a recipe's training steps ran: the precision in the stage config the demo ``written`` (the
    trainers' ``auto`` resolved on its device), else what the demo would write on ``device`` (the preset's
    ``precision``, default ``auto``, bf16 only where the device has it)."""
    asked = str(settings.get("precision", "auto"))
    if asked == "auto":
        asked = auto_precision(torch.device(device))
    if written is not None and written.is_file():
        cfg = yaml.safe_load(written.read_text()) or {}
        precision = str(cfg.get("precision", "auto"))
        if precision == "auto":
            precision = auto_precision(torch.device(str(cfg.get("device", device))))
    else:
        precision = native_precision(asked, torch.device(device))
    if precision == "fp32":
        return "trained in fp32" + (
            " (the preset's bf16 is emulated on a CPU without bf16 instructions)"
            if asked == "bf16" else "")
    return f"trained under {precision} autocast (weights and optimizer state in fp32)"


def _vlm_attack_text(preset: DemoPreset, device: str) -> str:
    """The caption / VQA attack in words, with the precision of its APGD runs on ``device`` (as
    :meth:`dvd.demo.Demo.attack_precision` passes it to the evaluations)."""
    n = preset.vlm_eval.references
    precision = resolve_precision(preset.vlm_eval.precision, device) or "fp32"  # auto: fp16 on CUDA only
    precision = native_precision(precision, torch.device(device))
    runs = "in fp32" if precision == "fp32" else f"under {precision} autocast"
    return {
        "ensemble": f"RobustVLM's ensemble (APGD on each of {n} references {runs}, an fp32 rerun on the best "
        "one, targeted VQA runs; each sample keeps its worst output)",
        "references": f"APGD on each of {n} references in turn, {runs} (RobustVLM's ensemble, which runs "
        "them in half precision, without its fp32 rerun and targeted runs; each sample keeps its worst "
        "output)",
        "apgd": f"APGD on the first reference, {runs}",
    }[preset.vlm_eval.attack]


def _delta2_eps(preset: DemoPreset) -> str:
    """The eps of Δ²LLaVA's training attack in the preset's stages (as the demo writes their configs;
    ``dvd train vlm``'s default if unset)."""
    values = {str(preset.vlm_stage_keys(stage).get("eps", VlmTrainConfig.eps)) for stage in preset.vlm_stages}
    return " / ".join(sorted(values))


def _samples(rows: Sequence[Row], task: str, limit: int) -> str:
    """How many samples ``task`` was evaluated on (its rows' ``n``; at most ``limit`` when none says)."""
    counts = sorted({int(r["n"]) for r in rows if r["task"] == task and r.get("n")})
    return "/".join(map(str, counts)) if counts else f"up to {limit}"


def mme_scope(images: int | None) -> str:
    """Which MME questions the demo asks, as the report says it."""
    if images is None:
        return "every question the world writes"
    return f"the questions of the first {images} images of each subtask (two each)"


def _shared_lm(preset: DemoPreset) -> str:
    """Where the VLMs' language model comes from, when the preset trains one for all of them."""
    if not preset.lm_training:
        return ""
    steps = preset.lm_training.get("steps")
    length = f"{steps} steps" if steps else f"{preset.lm_training.get('epochs', 1)} epoch(s)"
    return (f", the same for every VLM: first trained alone for {length} on the text of the world's "
            "training conversations, as the paper's VLMs share Vicuna")


def _delta2_recipe(preset: DemoPreset) -> str:
    """How Δ²LLaVA is trained: PGD on every batch of both stages, or from a branch point of delta-llava's
    stage 2 on (``delta2_branch_step``), with the eps ramp (``eps_warmup_steps``) if there is one."""
    branch = preset.delta2_branch_step
    if branch is None:
        return (f"ΔCLIP, and PGD at eps {_delta2_eps(preset)} on every training batch of both stages"
                f"{_delta2_ramp(preset)}")
    stage2 = preset.vlm_stage_keys("stage2")
    attack = (f"PGD-{stage2.get('attack_steps', VlmTrainConfig.attack_steps)} at eps "
              f"{stage2.get('eps', VlmTrainConfig.eps)}")
    ramp = stage2.get("eps_warmup_steps")
    return (f"delta-llava's run up to step {branch} of stage 2, then {attack} on every training batch"
            + (f"; eps ramped up from 0 over the next {ramp} steps" if ramp else ""))


def _delta2_ramp(preset: DemoPreset) -> str:
    """How Δ²LLaVA's training eps is ramped up, if it is (``eps_warmup_steps`` of a stage)."""
    ramps = [f"{stage.replace('stage', 'stage ')} over its first {n} steps" for stage in preset.vlm_stages
             if (n := preset.vlm_stage_keys(stage).get("eps_warmup_steps"))]
    return f"; eps ramped up from 0 in {' and '.join(ramps)}" if ramps else ""


def _elapsed(stages: dict[str, dict[str, Any]]) -> tuple[float, int] | None:
    """(seconds from the first stage start to the last stage end of the run that finished last, how many
    stages earlier runs finished), or None if unknown. A re-run that reuses stages is timed alone."""
    def parse(text: str) -> datetime.datetime:
        return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S")

    timed = [
        i for name, i in stages.items()
        if name != "report" and i.get("started") and i.get("finished") and i.get("seconds") is not None
    ]
    if not timed:
        return None
    last_run = max(timed, key=lambda i: parse(i["finished"])).get("run")
    mine = [i for i in timed if i.get("run") == last_run]
    span = max(parse(i["finished"]) for i in mine) - min(parse(i["started"]) for i in mine)
    return span.total_seconds(), len(timed) - len(mine)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def summary_json(rows: Sequence[Row]) -> str:
    """The headline numbers as one JSON line (for scripts and the tests)."""
    return json.dumps({m: {k: round(v, 4) for k, v in vals.items()} for m, vals in headline(rows).items()})


