"""``dvd train lm``: the LLaVA's language model learns the world's conversations from their text alone (the
image takes no position, the loss is on the answers), resumes exactly, runs under a 2-process torchrun, and is
the ``lm`` a VLM starts from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from _train_helpers import run, torchrun_command
from dvd.cli import main as dvd_main
from dvd.config import ConfigError, load_config
from dvd.models.vlm_conversation import IGNORE_INDEX, IMAGE_TOKEN, VLMCollator, get_template
from dvd.models.vlm_tokenizer import ensure_image_token
from dvd.train.lm import LmTrainConfig, encode_conversations, text_source, train_lm
from dvd.train.vlm_data import shapesworld_tokenizer

TINY_LM = (
    "lm={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
    "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}"
)
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvd.data.shapesworld import generate

    root = tmp_path_factory.mktemp("lm-world")
    generate(root / "sw", seed=0, size=64, image_size=32, eval_size=8, instruct_size=32)
    (root / "lm_test_vit.json").write_text(json.dumps(TINY_VIT))
    return root


def lm_args(world: Path, out: Path, *extra: str) -> list[str]:
    return [f"data={world / 'sw'}", f"output_dir={out}", TINY_LM, "template=vicuna_v1_short", "batch_size=8",
            "progress=false", "log_every=1", *extra]


def collator(world: Path) -> VLMCollator:
    tokenizer = shapesworld_tokenizer(world / "sw")
    return VLMCollator(tokenizer, get_template("vicuna_v1_short"), num_image_tokens=0,
                       image_token_id=ensure_image_token(tokenizer))


def mean_answer_nll(folder: Path, world: Path) -> float:
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    encoded, _ = encode_conversations(text_source(str(world / "sw"))[0], collator(world))
    batch = collator(world).pad(encoded[:32])
    with torch.no_grad():
        out = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return float(out.loss)


def test_the_text_is_the_conversation_without_the_image_and_only_the_answers_are_learned(world):
    files, root = text_source(str(world / "sw"))
    assert root == world / "sw"
    assert [f.name for f in files] == ["stage1_captions.json", "stage2_instruct.json"]
    encoded, skipped = encode_conversations(files, collator(world))
    assert skipped == 0 and len(encoded) == 2 * 32  # every stage-1 caption and stage-2 conversation
    tokenizer = collator(world).tokenizer
    record = json.loads(files[1].read_text())[0]["conversations"]
    ids, labels = encoded[32]
    words = tokenizer.decode(ids).split()  # the world's tokenizer is word-level, lower case
    assert collator(world).image_token_id not in ids and IMAGE_TOKEN not in words
    assert words[:3] == ["<s>", "user", ":"] and "assistant" in words
    learned = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    answers = [turn["value"] for turn in record if turn["from"] == "gpt"]
    assert learned.split() == " ".join(f"{a} {tokenizer.eos_token}" for a in answers).lower().split()


def test_training_lowers_the_answer_nll_and_a_vlm_starts_from_exactly_the_trained_lm(world, tmp_path):
    fresh, trained = tmp_path / "fresh", tmp_path / "lm"
    assert dvd_main(["train", "lm", *lm_args(world, fresh, "steps=1", "lr=1e-9")]) == 0
    assert dvd_main(["train", "lm", *lm_args(world, trained, "steps=40", "lr=3e-3", "warmup_steps=2")]) == 0
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["conversations"] == 64 and summary["skipped_samples"] == 0
    assert mean_answer_nll(trained / "final", world) < mean_answer_nll(fresh / "final", world) - 1.0

    vlm = tmp_path / "vlm"
    code = dvd_main(["train", "vlm", f"data={world / 'sw'}", f"output_dir={vlm}", f"lm={trained / 'final'}",
                     f"vision={world / 'lm_test_vit.json'}", "stage=1", "steps=1", "batch_size=4",
                     "template=vicuna_v1_short", "progress=false"])
    assert code == 0
    ours, theirs = load_file(str(vlm / "final" / "lm" / "model.safetensors")), load_file(
        str(trained / "final" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_run_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(world, tmp_path):
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    run = ["steps=6", "checkpoint_every=3"]
    assert dvd_main(["train", "lm", *lm_args(world, straight, *run)]) == 0
    assert dvd_main(["train", "lm", *lm_args(world, parts, *run, "stop_at=3")]) == 0
    assert not (parts / "final").exists()
    assert dvd_main(["train", "lm", *lm_args(world, parts, *run, "resume=latest")]) == 0
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(parts / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_malformed_conversations_are_skipped_and_counted_and_text_only_ones_kept(world, tmp_path):
    good = [{"from": "human", "value": "What is a circle?"}, {"from": "gpt", "value": "a shape"}]
    data = tmp_path / "mix.json"
    data.write_text(json.dumps([
        {"conversations": good},  # text-only: kept
        {"conversations": [{"from": "gpt", "value": "no question first"}, {"from": "human", "value": "?"}]},
        {"id": "no conversations"},
        {"image": "x.png", "conversations": good},
    ]))
    encoded, skipped = encode_conversations(text_source(str(data))[0], collator(world))
    assert len(encoded) == 2 and skipped == 2


@pytest.mark.parametrize(("args", "message"), [
    ([], "no training text; set data="),
    (["data=/nonexistent/world"], "no such data file or folder"),
    (["data=WORLD", "distributed=fsdp"], "distributed=ddp"),
    (["data=WORLD", "steps=0"], "steps must be"),
])
def test_bad_settings_are_one_line_errors_naming_the_fix(args, message, world, tmp_path):
    args = [a.replace("WORLD", str(world / "sw")) for a in args]
    cfg = load_config(LmTrainConfig, None, [f"output_dir={tmp_path}", *args])
    with pytest.raises((ConfigError, FileNotFoundError), match=message) as error:
        train_lm(cfg)
    assert "\n" not in str(error.value)


def test_the_shipped_lm_recipe_is_a_valid_config_for_the_vlms_template():
    from dvd.train.lm import check_config

    cfg = check_config(load_config(LmTrainConfig, Path(__file__).parents[1] / "configs" / "lm_demo.yaml"))
    assert cfg.template == "vicuna_v1_short" and cfg.tokenizer == "shapesworld"


def test_two_process_torchrun_trains_both_ranks_in_step_and_rank_0_saves_the_final_model(world, tmp_path):
    out = tmp_path / "ddp"
    result = run(torchrun_command("dvd.train.lm", lm_args(world, out, "steps=4", "checkpoint_every=2",
                                                          "device=cpu")))
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "step-000000004" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["data"][0]["samples"] == state["data"][1]["samples"] == 32
    assert json.loads((out / "summary.json").read_text())["step"] == 4
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
