"""What ``dvd demo`` runs and where it writes: the presets (``configs/demo/*.yaml``, found by scanning
that folder, as open_clip finds its model configs), the models it trains, the folder layout and what
the report takes."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dvd.config import ConfigError, suggest
from dvd.data.shapesworld_spec import spec_from_mapping

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"
HIDDEN_PRESETS = ("test",)  # the tests' preset: valid, but not offered on the command line
CLIP_MODELS = ("clean-clip", "delta-clip", "tecoa", "fare")
# the VLMs: LLaVA's recipe on four towers; only Δ²LLaVA is tuned adversarially (PGD in both stages, or in
# stage 2 from its branch point on delta-llava's run: ``DemoPreset.delta2_branch_step``)
VLM_MODELS = ("clean-llava", "fare-llava", "delta-llava", "delta2-llava")
VISION_TOWER = {  # the CLIP each VLM is built on
    "clean-llava": "clean-clip",
    "fare-llava": "fare",
    "delta-llava": "delta-clip",
    "delta2-llava": "delta-clip",
}
ADVERSARIAL_VLMS = ("delta2-llava",)
BRANCHES = {"delta2-llava": "delta-llava"}  # with ``delta2_branch_step``: the clean run Δ²LLaVA branches off
LM_MODEL = "lm"  # the VLMs' shared language model (OUT/models/lm), when the preset trains one
# the targeted attack's goal: a fluent ShapesWorld caption that describes none of the test images' truth
TARGET_CAPTION = "an image of four pink hearts."
# the caption / VQA attacks a preset may choose: dvd.eval.vlm_attack.REFERENCE_ATTACKS but "none", written out
# so that loading a preset does not import torch and transformers (a test keeps the two in step)
VLM_EVAL_ATTACKS = ("ensemble", "references", "apgd")
VLM_EVAL_PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # dvd.eval.vlm_objective.PRECISIONS, likewise
TASK_ORDER = ("color", "shape", "count", "size", "texture")  # the ShapesWorld tasks, as reported
VLM_EVALS = {  # the VLM evaluations, in the report's order, and their commands' modules
    "caption": "dvd.eval.captioning",
    "vqa": "dvd.eval.vqa",
    "pope": "dvd.eval.pope",
    "targeted": "dvd.eval.targeted",
    "scienceqa": "dvd.eval.scienceqa",
    "mme": "dvd.eval.mme",
}


@dataclass(frozen=True)
class WorldSize:
    """The ShapesWorld the demo generates (``dvd data shapesworld`` flags)."""

    size: int = 10000  # pre-training pairs
    image_size: int = 32
    eval_size: int = 200  # held-out images (COCO / VQA / POPE), and zero-shot test images per task
    instruct_size: int = 1000  # LLaVA training images
    # ShapesWorldSpec overrides (``dvd data shapesworld --spec``; empty: the default world)
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ZeroShotBudget:
    """The zero-shot evaluation (``dvd eval zeroshot``): its attack and images per task."""

    attack: str = "apgd-ce"
    steps: int = 100
    limit: int = 100
    # Square Attack queries when a gradient-masking check fires (--escalation-queries; 5000 is AutoAttack
    # standard's budget)
    escalation_queries: int = 5000
    # Square Attack queries of the gradient-free check on the samples APGD left standing (--check-queries;
    # 200 is dvd.attacks.robustness.CHECK_QUERIES)
    check_queries: int = 200


@dataclass(frozen=True)
class Budget:
    """An evaluation's size and attack: ``limit`` samples, attacked with ``steps`` steps."""

    limit: int
    steps: int


@dataclass(frozen=True)
class VlmEvalBudget:
    """The caption / VQA / POPE evaluations of the VLMs."""

    limit: int = 20
    eps: tuple[str, ...] | None = None  # caption / VQA budgets; None: the CLIPs' ``eps``
    # VQA questions (None: ``limit``); VQA accuracy moves in steps of 1/limit, so it may need more samples
    # than CIDEr does to tell two VLMs apart
    vqa_limit: int | None = None
    references: int = 5  # reference captions / answers each caption / VQA attack is run against
    steps: int = 20
    # the caption / VQA attack: "ensemble" (RobustVLM's: APGD per reference, an fp32 rerun on the best
    # one, targeted VQA runs) or "references" (its APGD per reference only)
    attack: str = "ensemble"
    # samples per batch of every VLM evaluation (more: faster on a CPU, same attack); the default is the
    # evaluations' own (dvd.eval.spec.VLM_DEFAULTS)
    batch_size: int = 8
    # autocast of the caption / VQA / ScienceQA APGD runs (`--attack-precision`): auto (the evaluations'
    # default: fp16 on CUDA, fp32 on a CPU), fp32, fp16 or bf16; bf16 on a CPU without bf16 instructions runs
    # in fp32 (as the trainings do)
    precision: str = "auto"

    def questions(self) -> int:
        """How many VQA questions are evaluated."""
        return self.limit if self.vqa_limit is None else self.vqa_limit


@dataclass(frozen=True)
class DemoPreset:
    """Everything the demo's stages take; ``quick`` is calibrated to show the paper's effect in minutes.
    The evaluation and world settings are grouped by the stage that reads them (one section each)."""

    name: str
    seed: int = 0
    world: WorldSize = field(default_factory=WorldSize)
    # CLIP training: settings shared by the four recipes, then per recipe (dvd train clip keys)
    clip_common: dict[str, Any] = field(default_factory=dict)
    # an open_clip model config of the demo's own (written to OUT/configs/<clip_model_name>.json), or None
    # to use ``clip_common["model"]`` as it is
    clip_model_config: dict[str, Any] | None = None
    clip_model_name: str = "dvd-demo-vit"
    clip_recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # evaluation: the same attack for every model
    eps: tuple[str, ...] = ("2/255", "4/255")
    zeroshot: ZeroShotBudget = field(default_factory=ZeroShotBudget)
    retrieval: Budget = field(default_factory=lambda: Budget(limit=100, steps=100))
    # the VLMs' language model trained once on the world's conversations, text only (dvd train lm keys),
    # then shared by every VLM as the paper's share Vicuna; empty: each VLM starts from a fresh LM
    lm_training: dict[str, Any] = field(default_factory=dict)
    # VLM (dvd train vlm keys), per stage; then the evaluations
    vlm_common: dict[str, Any] = field(default_factory=dict)
    vlm_stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Δ²LLaVA's stage 2 branches off delta-llava's at this step (`dvd train vlm branch_from`; a multiple of
    # stage 2's checkpoint_every): the two share stage 1 and stage 2's first steps and differ only in the
    # adversarial steps after; None: Δ²LLaVA runs both stages adversarially from its own start (the paper's)
    delta2_branch_step: int | None = None
    vlm_eval: VlmEvalBudget = field(default_factory=VlmEvalBudget)
    targeted: Budget = field(default_factory=lambda: Budget(limit=5, steps=100))
    # ScienceQA: questions (image and text-only, each), clean and attacked, and APGD steps (at the
    # ``vlm_eval.eps``)
    scienceqa: Budget = field(default_factory=lambda: Budget(limit=50, steps=20))
    # MME (clean): the questions of each subtask's first ``mme_images`` images (`dvd eval mme
    # --images-per-subtask`); None: every question the world writes
    mme_images: int | None = None
    example_steps: int = 100  # APGD steps of the report's example grid

    def vlm_stage_keys(self, stage: str) -> dict[str, Any]:
        """The ``dvd train vlm`` keys the preset gives ``stage``: its own over ``vlm_common``."""
        return {**self.vlm_common, **self.vlm_stages[stage]}

    def fingerprint(self) -> dict[str, Any]:
        """What the stages' outputs depend on (a folder made with other settings is not reused)."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))  # as stored in demo.json (tuples -> lists)
        if not self.world.spec:  # the default world: the fingerprint of earlier demo folders, which resume
            del out["world"]["spec"]
        if not self.lm_training:  # likewise without a shared LM
            del out["lm_training"]
        if self.delta2_branch_step is None:  # likewise without a branch
            del out["delta2_branch_step"]
        if self.mme_images is None:  # likewise with every MME question
            del out["mme_images"]
        if out["zeroshot"]["check_queries"] == ZeroShotBudget().check_queries:  # likewise at its default
            del out["zeroshot"]["check_queries"]
        defaults = dataclasses.asdict(VlmEvalBudget())
        for key in ("vqa_limit", "attack", "batch_size", "precision"):  # likewise, at their defaults
            if out["vlm_eval"][key] == defaults[key]:
                del out["vlm_eval"][key]
        return out


def preset_names(directory: Path = PRESET_DIR) -> list[str]:
    """The presets offered on the command line: every ``*.yaml`` in ``directory`` but the hidden ones."""
    return sorted(p.stem for p in directory.glob("*.yaml") if p.stem not in HIDDEN_PRESETS)


def load_preset(name: str, directory: Path = PRESET_DIR) -> DemoPreset:
    """The preset ``directory/NAME.yaml``, or the file ``name`` when it ends in .yaml (a preset of one's
    own; its name is that path); unknown keys (at the top or in a section) and names are one-line errors;
    a section's missing keys keep :class:`DemoPreset`'s defaults."""
    own = name.endswith((".yaml", ".yml"))
    path = Path(name) if own else directory / f"{name}.yaml"
    if not path.is_file():
        if own:
            raise FileNotFoundError(f"preset file {name} does not exist; give a YAML file or one of "
                                    f"{', '.join(preset_names(directory))}")
        if not directory.is_dir():
            raise FileNotFoundError(f"no demo presets in {directory}; run dvd demo from a dvd checkout")
        raise ConfigError(f"unknown preset {name!r}{suggest(name, preset_names(directory))}")
    values = _checked(yaml.safe_load(path.read_text()) or {}, DemoPreset, "", path)
    defaults = DemoPreset(name=name)
    for key, value in values.items():
        section = getattr(defaults, key)
        if dataclasses.is_dataclass(section):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} in {path} must be a mapping of {_keys(section)}, got {value!r}")
            values[key] = dataclasses.replace(section, **_checked(value, type(section), f"{key}.", path))
    preset = dataclasses.replace(defaults, **values)
    spec_from_mapping(preset.world.spec, f"world.spec of {path}")  # a bad override fails now, not mid-demo
    if preset.vlm_eval.attack not in VLM_EVAL_ATTACKS:
        attack = str(preset.vlm_eval.attack)
        raise ConfigError(f"vlm_eval.attack in {path} must be one of {', '.join(VLM_EVAL_ATTACKS)}, got "
                          f"{attack!r}{suggest(attack, VLM_EVAL_ATTACKS)}")
    if preset.vlm_eval.precision not in VLM_EVAL_PRECISIONS:
        precision = str(preset.vlm_eval.precision)
        raise ConfigError(f"vlm_eval.precision in {path} must be one of {', '.join(VLM_EVAL_PRECISIONS)}, "
                          f"got {precision!r}{suggest(precision, VLM_EVAL_PRECISIONS)}")
    if not isinstance(preset.vlm_eval.batch_size, int) or preset.vlm_eval.batch_size < 1:
        raise ConfigError(f"vlm_eval.batch_size in {path} must be a positive integer, got "
                          f"{preset.vlm_eval.batch_size!r}")
    images = preset.mme_images
    if images is not None and (not isinstance(images, int) or isinstance(images, bool) or images < 1):
        raise ConfigError(f"mme_images in {path} must be a positive number of images per MME subtask, or "
                          f"null for every question, got {images!r}")
    _check_branch(preset, path)
    return preset


def _check_branch(preset: DemoPreset, path: Path) -> None:
    """``delta2_branch_step`` names a checkpoint inside stage 2 (one-line errors)."""
    step = preset.delta2_branch_step
    if step is None:
        return
    stage2 = preset.vlm_stage_keys("stage2") if "stage2" in preset.vlm_stages else {}
    steps, every = stage2.get("steps"), stage2.get("checkpoint_every", 100)
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ConfigError(f"delta2_branch_step in {path} must be a positive step of stage 2, got {step!r}")
    if not isinstance(steps, int) or step >= steps:
        raise ConfigError(f"delta2_branch_step in {path} ({step}) must be below vlm_stages.stage2.steps "
                          f"({steps!r}); set both")
    if step % every:
        raise ConfigError(f"delta2_branch_step in {path} ({step}) must be a multiple of stage 2's "
                          f"checkpoint_every ({every}), where delta-llava's run keeps a checkpoint")


def _keys(section: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(section))


def _checked(values: dict[str, Any], cls: type, prefix: str, path: Path) -> dict[str, Any]:
    """``values`` for the fields of ``cls``, YAML lists made the tuples it holds; an unknown key (named
    ``prefix`` + key) is a one-line error."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must be a mapping of preset keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - {"name"}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown key {prefix + str(key)!r} in {path}{suggest(str(key), known)}")
    return {k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v for k, v in values.items()}


@dataclass(frozen=True)
class DemoLayout:
    """Where the demo in ``out`` keeps the world, the models and the result rows."""

    out: Path

    @property
    def world(self) -> Path:
        return self.out / "world"

    def model_dir(self, name: str) -> Path:
        return self.out / "models" / name

    def final(self, name: str) -> Path:
        return self.model_dir(name) / "final"

    def results_file(self, task: str, model: str) -> Path:
        return self.out / "results" / f"{task}-{model}.json"

    def samples_dir(self, task: str, model: str) -> Path:
        """The per-sample records of a caption or VQA evaluation (``--save-samples``: the outputs, clean and
        attacked, that the report pairs across models)."""
        return self.out / "samples" / f"{task}-{model}"

    def samples_file(self, task: str, model: str, eps: float) -> Path | None:
        """The records of that evaluation's budget ``eps`` (:func:`dvd.eval.samples.sample_set_name`'s
        ``...-eps<k>of255.jsonl``); None unless exactly one file matches."""
        from dvd.eval.samples import eps_tag

        found = sorted(self.samples_dir(task, model).glob(f"*-{eps_tag(eps)}.jsonl"))
        return found[0] if len(found) == 1 else None

    def sample_records(self, task: str, model: str, eps: float) -> list[dict[str, Any]] | None:
        """The records of :meth:`samples_file`, or None (a :data:`dvd.demo_claims.SampleSource`)."""
        path = self.samples_file(task, model, eps)
        if path is None:
            return None
        from dvd.eval.paired import read_records

        return read_records(path)

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    def example_grid(self, half: str) -> Path:
        """The report's example grid of the CLIPs (``half`` ``clip``) or of the VLMs (``vlm``)."""
        return self.figures / {"clip": "examples.png", "vlm": "examples_vlm.png"}[half]

    def stage_config(self, name: str) -> Path:
        """The ``dvd train`` config the demo wrote for ``name`` (``delta-clip``, ``delta2-llava-stage2``)."""
        return self.out / "configs" / f"{name}.yaml"


@dataclass(frozen=True)
class ReportInputs:
    """What the report takes besides the demo folder's files: plain values, not the running demo."""

    layout: DemoLayout
    preset: DemoPreset
    device: str
    include_vlm: bool
