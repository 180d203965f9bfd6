"""Released LLaVA layouts (full LLaVA-1.5, LoRA release, projector only) load into dvd and give the
same outputs as the same weights converted to ``llava-hf`` with transformers' own conversion table."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import constants
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import CLIPVisionModel

from _llava_layouts import (
    IMAGE_SIZE,
    clip_tower_dir,
    llama,
    llava_config,
    projector_weights,
    to_llava_hf,
    tokenizer,
    write_full,
    write_sharded,
)
from dvd.cli import main
from dvd.config import ConfigError
from dvd.data.shapesworld import generate
from dvd.data.shapesworld_reasoning import write_reasoning_sets
from dvd.data.shapesworld_scenes import Scene
from dvd.eval.results import read_rows
from dvd.eval.vlm_attack import load_model
from dvd.models.clip import create_clip, save_clip
from dvd.models.llava_original import (
    checkpoint_layout,
    is_llava_original,
    load_llava_original,
    read_weights,
)
from dvd.models.llava_preprocess import model_transform
from dvd.models.vlm import vision_tower_from_clip
from dvd.models.vlm_hf import load_hf_llava
from dvd.models.vlm_io import load_vlm

PROMPTS = ["What color is the circle?", "Provide a short caption for this image."]
ANSWERS = ["red.", "a blue square."]


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def assert_same_model(ours, oracle) -> None:
    x = images()
    ours_batch = ours.collator().pairs(PROMPTS, ANSWERS)
    oracle_batch = oracle.collator().pairs(PROMPTS, ANSWERS)
    assert torch.equal(ours_batch.input_ids, oracle_batch.input_ids)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_images(x), oracle.encode_images(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            ours.per_sample_nll(x, ours_batch), oracle.per_sample_nll(x, oracle_batch), rtol=1e-5, atol=1e-5
        )
    assert ours.generate(x, PROMPTS, max_new_tokens=6) == oracle.generate(x, PROMPTS, max_new_tokens=6)


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_full_llava_15_layout_equals_its_llava_hf_conversion(tmp_path, safetensors):
    tok = tokenizer()
    lm = llama(tok)
    clip_dir = clip_tower_dir(tmp_path)
    state = write_full(tmp_path / "llava-v1.5-tiny", lm, tok, str(clip_dir), safetensors=safetensors)
    assert is_llava_original(tmp_path / "llava-v1.5-tiny")
    assert checkpoint_layout(tmp_path / "llava-v1.5-tiny") == "full"
    ours = load_llava_original(tmp_path / "llava-v1.5-tiny")
    oracle = load_hf_llava(str(to_llava_hf(tmp_path / "hf", state, lm.config, clip_dir, tok)))
    assert ours.template.name == "vicuna_v1" == oracle.template.name
    assert_same_model(ours, oracle)
    wide = Image.new("RGB", (64, 32), (255, 255, 255))  # image_aspect_ratio "pad": mean-colour margins
    pixels = model_transform(ours)(wide)
    assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(pixels[:, 0, 0], torch.tensor([122, 116, 104]) / 255, atol=1e-6)
    assert torch.allclose(pixels[:, IMAGE_SIZE // 2, 0], torch.ones(3))


def test_trained_tower_weights_in_the_checkpoint_replace_the_named_towers(tmp_path):
    tok = tokenizer()
    lm = llama(tok)
    clip_dir = clip_tower_dir(tmp_path)
    tuned = clip_tower_dir(tmp_path / "tuned", seed=7)  # stands for adversarially tuned tower weights
    tower_state = CLIPVisionModel.from_pretrained(tuned).state_dict()
    state = write_full(tmp_path / "ckpt", lm, tok, str(clip_dir), safetensors=True, tower_state=tower_state)
    ours = load_llava_original(tmp_path / "ckpt")
    oracle = load_hf_llava(str(to_llava_hf(tmp_path / "hf", state, lm.config, clip_dir, tok)))
    named = load_hf_llava(str(to_llava_hf(tmp_path / "hf-named", {}, lm.config, clip_dir, tok)))
    assert_same_model(ours, oracle)
    with torch.no_grad():
        assert not torch.allclose(ours.encode_images(images()), named.encode_images(images()))


def lora_release(tmp_path, tok, clip_dir, *, adapter_bin: bool):
    """The paper's Δ²LLaVA layout: base LM dir, and config + PEFT adapter + non_lora_trainables.bin."""
    base = llama(tok)
    base_dir = tmp_path / "vicuna-tiny"
    base_dir.mkdir()
    base.config.save_pretrained(base_dir)
    write_sharded(base_dir, base.state_dict(), safetensors=False)  # lmsys/vicuna-7b-v1.5 ships .bin shards
    tok.save_pretrained(base_dir)
    torch.manual_seed(3)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    peft = get_peft_model(llama(tok), config)
    lora_dir = tmp_path / "delta2-llava-tiny-lora"
    peft.save_pretrained(lora_dir, safe_serialization=not adapter_bin)
    (lora_dir / "config.json").write_text(json.dumps(llava_config(base, str(clip_dir))))
    trainables = {f"base_model.model.{k}": v for k, v in projector_weights().items()}
    torch.save(trainables, lora_dir / "non_lora_trainables.bin")
    merged = peft.merge_and_unload()
    state = {**merged.state_dict(), **projector_weights()}
    return base_dir, lora_dir, state, base.config


@pytest.mark.parametrize("adapter_bin", [False, True], ids=["adapter-safetensors", "adapter-bin"])
def test_lora_release_is_merged_onto_the_base_and_equals_llava_hf(tmp_path, adapter_bin):
    tok = tokenizer()
    clip_dir = clip_tower_dir(tmp_path)
    base_dir, lora_dir, state, config = lora_release(tmp_path, tok, clip_dir, adapter_bin=adapter_bin)
    assert checkpoint_layout(lora_dir) == "lora"
    ours = load_llava_original(lora_dir, model_base=base_dir)
    assert not hasattr(ours.lm, "peft_config")  # merged
    oracle = load_hf_llava(str(to_llava_hf(tmp_path / "hf", state, config, clip_dir, tok)))
    assert_same_model(ours, oracle)


def test_projector_only_checkpoint_on_a_base_equals_llava_hf(tmp_path):
    tok = tokenizer()
    clip_dir = clip_tower_dir(tmp_path)
    base = llama(tok)
    base_dir = tmp_path / "vicuna-tiny"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    stage1 = tmp_path / "llava-v1.5-tiny-pretrain"
    stage1.mkdir()
    (stage1 / "config.json").write_text(json.dumps(llava_config(base, str(clip_dir))))
    torch.save(projector_weights(), stage1 / "mm_projector.bin")
    assert checkpoint_layout(stage1) == "projector"
    ours = load_llava_original(stage1, model_base=base_dir)
    state = {**base.state_dict(), **projector_weights()}
    oracle = load_hf_llava(str(to_llava_hf(tmp_path / "hf", state, base.config, clip_dir, tok)))
    assert_same_model(ours, oracle)


def test_open_clip_tower_with_trained_weights_from_non_lora_trainables(tmp_path):
    """Δ²LLaVA's shape: ``mm_vision_tower = open_clip:...`` and the tuned tower in non_lora_trainables."""
    tok = tokenizer()
    torch.manual_seed(5)
    clip_dir = save_clip(create_clip("dvd-tiny-vit"), tmp_path / "delta-clip-tiny")
    base_dir, lora_dir, _, _ = lora_release(tmp_path, tok, tmp_path, adapter_bin=False)
    tuned = create_clip("dvd-tiny-vit")  # fresh random weights: the "adversarially tuned" tower
    visual = {k: v.clone() for k, v in tuned.model.visual.state_dict().items()}
    projector = projector_weights(width=64)
    trainables = {
        **{f"base_model.model.{k}": v for k, v in projector.items()},
        **{f"base_model.model.model.vision_tower.vision_tower.{k}": v for k, v in visual.items()},
    }
    torch.save(trainables, lora_dir / "non_lora_trainables.bin")
    config = json.loads((lora_dir / "config.json").read_text())
    config.update(mm_vision_tower=f"open_clip:{clip_dir}", mm_hidden_size=64)
    (lora_dir / "config.json").write_text(json.dumps(config))
    ours = load_llava_original(lora_dir, model_base=base_dir)
    expected_tower = vision_tower_from_clip(tuned)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ours.vision_tower(x), expected_tower(x))
        torch.testing.assert_close(ours.projector[0].weight, projector["model.mm_projector.0.weight"])


def test_eval_model_loader_dispatches_original_layouts_and_needs_the_base(tmp_path):
    tok = tokenizer()
    clip_dir = clip_tower_dir(tmp_path)
    base_dir, lora_dir, _, _ = lora_release(tmp_path, tok, clip_dir, adapter_bin=False)
    model = load_model(str(lora_dir), device="cpu", model_base=str(base_dir))
    assert model.llava_layout == "lora"
    with pytest.raises(ConfigError, match="--model-base"):
        load_model(str(lora_dir), device="cpu")
    with pytest.raises(ConfigError, match="--model-base applies to"):
        load_model(str(base_dir), device="cpu", model_base=str(base_dir))  # a plain LM is no LLaVA release


class Payload:
    """Any class: unpickling it would run import machinery a weights-only load refuses."""


def test_pickles_that_are_not_plain_tensors_are_refused(tmp_path):
    path = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(1), "note": Payload()}, path)
    with pytest.raises(ValueError, match="refused.*weights_only"):
        read_weights(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="dict of tensors"):
        read_weights(path)


def test_unsupported_settings_are_one_line_errors(tmp_path):
    tok = tokenizer()
    lm = llama(tok)
    clip_dir = clip_tower_dir(tmp_path)
    write_full(tmp_path / "ckpt", lm, tok, str(clip_dir), safetensors=True)
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    for change, message in [
        ({"mm_projector_type": "linear"}, "mm_projector_type"),
        ({"image_aspect_ratio": "anyres"}, "anyres"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"mm_hidden_size": 48}, "mm_hidden_size"),
    ]:
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises((ConfigError, ValueError), match=message):
            load_llava_original(tmp_path / "ckpt")
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="drop --model-base"):
        load_llava_original(tmp_path / "ckpt", model_base=tmp_path)


def test_hub_names_resolve_offline_from_the_cache(tmp_path, monkeypatch):
    """``--model liuhaotian/llava-v1.5-7b`` reads the cached snapshot (huggingface_hub's layout)."""
    tok = tokenizer()
    cache = tmp_path / "hub"
    repo = cache / "models--liuhaotian--llava-v1.5-tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    clip_dir = clip_tower_dir(tmp_path)
    write_full(snapshot, llama(tok), tok, str(clip_dir), safetensors=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert is_llava_original("liuhaotian/llava-v1.5-tiny")
    assert not is_llava_original("liuhaotian/llava-v1.5-absent")
    model = load_model("liuhaotian/llava-v1.5-tiny", device="cpu")
    assert model.llava_layout == "full"
    assert load_vlm(snapshot).llava_layout == "full"  # dvd's own loader takes the layout too


def test_a_lora_release_runs_through_a_dvd_eval_command(tmp_path):
    """``dvd eval mme --model LORA_DIR --model-base BASE`` end to end, rows naming the template."""
    world = tmp_path / "world"
    generate(world, size=20, eval_size=4, image_size=IMAGE_SIZE)
    scenes = json.loads((world / "images" / "scenes.json").read_text())
    tests = [s for s in scenes if s["file_name"].startswith("test/")]
    held_out = [(s["image_id"], s["file_name"], Scene.from_json(s)) for s in tests]
    write_reasoning_sets(world, 0, held_out)
    tok = tokenizer()
    base_dir, lora_dir, _, _ = lora_release(tmp_path, tok, clip_tower_dir(tmp_path), adapter_bin=False)
    out = tmp_path / "rows.json"
    args = ["eval", "mme", "--model", str(lora_dir), "--model-base", str(base_dir), "--data", str(world)]
    assert main([*args, "--out", str(out), "--no-progress", "--max-new-tokens", "2"]) == 0
    rows = read_rows(out)
    assert rows and {(r.model, r.template) for r in rows} == {("delta2-llava-tiny-lora", "vicuna_v1")}
