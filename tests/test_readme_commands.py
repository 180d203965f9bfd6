"""Every `dvd ...` command in README.md parses with its real argument parser, refers only to paths that
`make demo` (or an earlier README command) writes, and the evaluation commands run as written on a
miniature of the demo's output (tiny models in the demo's layout, with --limit and few attack steps)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from _eval_helpers import world_tokenizer
from dvd.cli import COMMANDS, main
from dvd.demo import Demo
from dvd.demo_preset import load_preset
from dvd.models.clip import create_clip, save_clip
from dvd.models.vlm import create_vlm
from dvd.models.vlm_io import save_vlm
from tiny_models import TINY_LLAMA, tiny_tower

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO = Path("runs/demo")  # `make demo` runs `dvd demo --out runs/demo`
INPUT_KEYS = ("model", "data", "vision", "pretrained", "init", "lm")  # config keys a training reads
FAST_CLIP = ["--limit", "2", "--steps", "1", "--batch-size", "2", "--no-progress"]
FAST_VLM = ["--limit", "2", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"]


def readme_commands() -> list[list[str]]:
    """The `dvd` command lines of the README's bash blocks, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "dvd":
                commands.append(words[1:])
    return commands


COMMAND_LINES = readme_commands()


def demo_outputs() -> set[Path]:
    """What `make demo` leaves behind, from the demo's own plan: its world, its CLIP model config (when the
    preset has one) and every trained model."""
    preset = load_preset("quick")
    demo = Demo(DEMO, preset)
    stages = [s.name for s in demo.stages()]
    trained = [name.removeprefix("train ").replace(" ", "-") for name in stages if name.startswith("train ")]
    own = {DEMO / "configs" / f"{preset.clip_model_name}.json"} if preset.clip_model_config else set()
    return {demo.world, *own, *(demo.final(name) for name in trained)}


class Parsed(Exception):
    """Raised by the patched parser once the real one accepted the arguments."""


def split(words: list[str]) -> tuple[str, list[str]]:
    for command, (module, _) in COMMANDS.items():
        if tuple(words[: len(command)]) == command:
            return module, words[len(command) :]
    raise AssertionError(f"README command 'dvd {' '.join(words)}' is not a dvd command")


def test_the_readme_has_commands_of_every_kind() -> None:
    kinds = {tuple(words[:2]) for words in COMMAND_LINES}
    assert {("train", "clip"), ("train", "vlm"), ("eval", "zeroshot"), ("eval", "caption")} <= kinds


@pytest.mark.parametrize("words", COMMAND_LINES, ids=lambda w: " ".join(w)[:60])
def test_every_readme_command_parses_with_its_real_parser(words, monkeypatch) -> None:
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        original(self, args, namespace)  # exits (SystemExit 2) on anything the parser refuses
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    module, argv = split(words)
    with pytest.raises(Parsed):
        importlib.import_module(module).cli(argv)


def test_readme_commands_read_only_what_the_demo_or_an_earlier_command_wrote() -> None:
    known = demo_outputs()
    for words in COMMAND_LINES:
        text = "dvd " + " ".join(words)
        if words[0] == "train":
            config = yaml.safe_load(Path(README.parent / words[words.index("--config") + 1]).read_text())
            for key in INPUT_KEYS:
                value = config.get(key)
                if isinstance(value, str) and value.startswith("runs/"):
                    assert {Path(value), Path(value) / "final"} & known, f"{text}: {key}={value} not written"
            known |= {Path(config["output_dir"]), Path(config["output_dir"]) / "final"}
            continue
        outputs = {"--out"} if words[:2] == ["data", "shapesworld"] else set()
        for flag, value in zip(words, words[1:], strict=False):
            if flag in outputs:
                known.add(Path(value))
            elif flag.startswith("--") and value.startswith("runs/") and flag != "--out":
                assert Path(value) in known, f"{text}: {flag} {value} is not written by make demo"


@pytest.fixture(scope="module")
def demo_miniature(shapesworld: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/demo in the demo's layout with tiny models: the world, every CLIP and the Δ²LLaVA."""
    root = tmp_path_factory.mktemp("readme")
    world = root / DEMO / "world"
    shutil.copytree(shapesworld, world)  # a copy, not a link: nothing run here may write into it
    torch.manual_seed(0)
    for path in sorted(demo_outputs()):
        name = path.parent.name
        if path == DEMO / "world" or not name.endswith(("clip", "tecoa", "fare", "stage2")):
            continue
        metadata = {"config": {"output_dir": str(path.parent)}}
        if name.endswith("stage2"):
            tokenizer = world_tokenizer(world)
            model = create_vlm(tiny_tower(), TINY_LLAMA, tokenizer=tokenizer, template="vicuna_v1_short")
            save_vlm(model, root / path, metadata=metadata)
        else:
            save_clip(create_clip("dvd-tiny-vit"), root / path, metadata=metadata)
    return root


EVALUATIONS = [w for w in COMMAND_LINES if w[0] == "eval" and all(not a.startswith("/") for a in w)]


@pytest.mark.parametrize("words", EVALUATIONS, ids=lambda w: " ".join(w)[:60])
def test_readme_evaluations_run_after_the_demo(words, demo_miniature, monkeypatch) -> None:
    monkeypatch.chdir(demo_miniature)
    fast = FAST_CLIP if words[1] in ("zeroshot", "retrieval") else FAST_VLM
    out = ["--out", f"readme-{words[1]}.json"]
    assert main([*words, *fast, *out]) == 0, " ".join(words)
