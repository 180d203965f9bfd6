"""The VLM's parts: tokenizer, conversations and collator, vision tower, checkpoints, HF LLaVA specifics."""

from __future__ import annotations

import copy
import json
import pickle

import open_clip
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dvd.config import ConfigError
from dvd.models.vlm import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    MLPProjector,
    VisionTower,
    create_vlm,
    make_conversation,
)
from dvd.models.vlm_conversation import VICUNA_SYSTEM, get_template
from dvd.models.vlm_hf import HFLlava, llava_with_open_clip_tower, load_hf_llava
from dvd.models.vlm_io import load_vlm, save_vlm
from dvd.models.vlm_tokenizer import build_tokenizer, ensure_image_token, texts_from_files
from tiny_models import (
    IMAGE_SIZE,
    PROMPTS,
    TINY_LLAMA,
    TINY_VIT,
    images,
    qa_batch,
    tiny_dvd_vlm,
    tiny_hf_llava,
    tiny_tokenizer,
    tiny_tower,
)


# --- tokenizer -------------------------------------------------------------------------------------
def test_small_world_tokenizer_has_the_special_tokens_first_and_lowercases_words():
    tokenizer = tiny_tokenizer()
    assert [
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.unk_token_id,
    ] == [
        0,
        1,
        2,
        3,
    ]
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == 4
    ids = tokenizer("A RED circle, a Zebra.", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "red", "circle", ",", "a", "<unk>", "."]
    assert tokenizer(f"x{IMAGE_TOKEN}red", add_special_tokens=False)["input_ids"][1] == 4


def test_small_world_tokenizer_decodes_words_with_tidy_punctuation():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("There is a red circle. Is there a star? No, there is not.", add_special_tokens=False)
    assert tokenizer.decode(ids["input_ids"]) == "there is a red circle. is there a star? no, there is not."


def test_tokenizer_knows_the_template_words_and_round_trips_through_save_pretrained(tmp_path):
    tokenizer = build_tokenizer(["red"])
    for word in ("user", "assistant", "curious", "polite"):
        assert tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = f"USER: {IMAGE_TOKEN}\nWhat color? ASSISTANT: red"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.eos_token_id == tokenizer.eos_token_id and len(loaded) == len(tokenizer)


def test_tokenizer_reads_text_from_llava_and_jsonl_files(tmp_path):
    llava = [
        {
            "id": "1",
            "image": "images/000001.png",
            "conversations": make_conversation("Which shape?", "Hexagon"),
        }
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "pope.jsonl").write_text(json.dumps({"question": "Is there a kite?", "label": "yes"}) + "\n")
    texts = list(texts_from_files([tmp_path / "llava.json", tmp_path / "pope.jsonl"]))
    assert texts == ["Which shape?", "Hexagon", "Is there a kite?", "yes"]
    tokenizer = build_tokenizer(texts)
    assert "hexagon" in tokenizer.get_vocab() and "000001" not in tokenizer.get_vocab()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        list(texts_from_files([tmp_path / "missing.json"]))


def test_ensure_image_token_adds_a_single_special_token_once():
    core = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "red": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    image_id = ensure_image_token(tokenizer)
    assert image_id == 3 and ensure_image_token(tokenizer) == 3 and len(tokenizer) == 4
    assert tokenizer(f"red{IMAGE_TOKEN}red", add_special_tokens=False)["input_ids"] == [2, 3, 2]


# --- conversation template and collator -----------------------------------------------------------
def test_vicuna_template_renders_llava_1_5_turns():
    segments = get_template("vicuna_v1").segments([("<image>\nQ1", "A1"), ("Q2", "A2")])
    assert segments == [
        (f"{VICUNA_SYSTEM} USER: <image>\nQ1 ASSISTANT:", False),
        ("A1", True),
        ("USER: Q2 ASSISTANT:", False),
        ("A2", True),
    ]
    assert get_template("plain").segments([("<image>\nDescribe.", "a red circle")]) == [
        (IMAGE_TOKEN, False),
        ("a red circle", True),
    ]
    with pytest.raises(ConfigError, match="did you mean 'vicuna_v1'"):
        get_template("vicuna-v1")


def test_collator_expands_the_image_and_supervises_every_answer_of_a_multi_turn_conversation():
    model = tiny_dvd_vlm()
    tokenizer, n = model.tokenizer, model.num_image_tokens
    conversation = make_conversation("What color is the circle?", "red") + make_conversation("How many?", "2")
    batch = model.collate([conversation])
    ids = batch.input_ids[0].tolist()
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(model.image_token_id) == n and batch.image_mask.sum() == n
    start = ids.index(model.image_token_id)
    assert ids[start : start + n] == [model.image_token_id] * n  # contiguous, where <image> was
    supervised = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    eos = tokenizer.eos_token_id
    assert supervised == [
        tokenizer.convert_tokens_to_ids("red"),
        eos,
        tokenizer.convert_tokens_to_ids("2"),
        eos,
    ]


def test_collator_puts_the_image_first_when_the_conversation_has_none_and_refuses_two():
    collator = tiny_dvd_vlm().collator()
    with_image = collator.conversations([make_conversation(f"{IMAGE_TOKEN}\nWhat color?", "red")])
    without = collator.conversations([make_conversation("What color?", "red")])
    assert torch.equal(with_image.input_ids, without.input_ids)
    with pytest.raises(ValueError, match="2 <image> tokens"):
        collator.conversations([make_conversation(f"{IMAGE_TOKEN} {IMAGE_TOKEN} what?", "red")])
    with pytest.raises(ValueError, match="from human"):
        collator.conversations([[{"from": "gpt", "value": "red"}, {"from": "human", "value": "what?"}]])


def test_training_batches_pad_right_and_generation_prompts_pad_left():
    collator = tiny_dvd_vlm().collator()
    train = collator.conversations([make_conversation("What?", "red"), make_conversation(PROMPTS[1], "2")])
    assert train.attention_mask[:, 0].all() and not train.attention_mask[0, -1]
    prompts = collator.prompts(["What?", PROMPTS[1]])
    assert prompts.attention_mask[:, -1].all() and not prompts.attention_mask[0, 0]
    assert (prompts.labels == IGNORE_INDEX).all()
    assert (prompts.image_mask.sum(1) == collator.num_image_tokens).all()


def test_plain_template_supervises_only_the_caption():
    model = tiny_dvd_vlm()
    collator = model.collator(template="plain")  # stage 1 on a model whose own template is a chat one
    batch = collator.conversations([make_conversation("Describe the image briefly.", "a red circle")])
    tokenizer = model.tokenizer
    expected = [tokenizer.bos_token_id] + [model.image_token_id] * model.num_image_tokens
    caption = tokenizer("a red circle", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert batch.input_ids[0].tolist() == expected + caption
    assert batch.labels[0].tolist() == [IGNORE_INDEX] * len(expected) + caption


def test_max_length_truncates_answers_but_never_the_image():
    model = tiny_dvd_vlm()
    conversation = [
        make_conversation("What color is the circle?", "there is a red circle and a blue square.")
    ]
    full = model.collate(conversation)
    truncated = model.collator(max_length=full.input_ids.shape[1] - 3).conversations(conversation)
    assert truncated.input_ids.shape[1] == full.input_ids.shape[1] - 3
    assert truncated.n_answer_tokens.item() == full.n_answer_tokens.item() - 3
    with pytest.raises(ConfigError, match="cuts the image tokens"):
        model.collator(max_length=5).conversations(conversation)


def test_collate_fn_skips_and_counts_malformed_samples():
    collator = tiny_dvd_vlm().collator()
    samples = [
        {"image": torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE), "conversations": make_conversation("What?", "red")},
        {
            "image": torch.ones(3, IMAGE_SIZE, IMAGE_SIZE),
            "conversations": [{"from": "human", "value": "orphan"}],
        },
        {"image": None, "conversations": make_conversation("What?", "red")},
    ]
    with pytest.warns(UserWarning, match="skipping a sample"):
        pixels, batch = collator(samples)
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and pixels.sum() == 0
    assert len(batch) == 1 and collator.skipped == 2
    with pytest.raises(ValueError, match="all 1 samples"), pytest.warns(UserWarning):
        collator(samples[2:])


def test_collator_survives_pickling_for_dataloader_workers():
    collator = tiny_dvd_vlm().collator(max_length=64)
    clone = pickle.loads(pickle.dumps(collator))
    conversations = [make_conversation("What color?", "red")]
    assert torch.equal(
        clone.conversations(conversations).input_ids, collator.conversations(conversations).input_ids
    )


def test_an_answer_free_batch_still_gives_a_connected_zero_loss():
    model = tiny_dvd_vlm()
    batch = model.collate([make_conversation("What?", "red")])
    batch.labels.fill_(IGNORE_INDEX)
    x = images(1).requires_grad_(True)
    out = model(x, batch)
    assert out.loss.item() == 0 and out.per_sample_nll.tolist() == [0.0]
    (grad,) = torch.autograd.grad(out.loss, x)
    assert grad.abs().sum() == 0


# --- vision tower and projector --------------------------------------------------------------------
def test_vision_tower_returns_the_penultimate_blocks_patch_tokens_of_normalised_images():
    torch.manual_seed(0)
    visual = open_clip.model._build_vision_tower(TINY_VIT["embed_dim"], TINY_VIT["vision_cfg"]).eval()
    reference = copy.deepcopy(visual)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    tower = VisionTower(visual, mean=mean, std=std, open_clip_cfg=TINY_VIT).eval()
    x = images(2)
    # by hand, through open_clip's public modules
    pixels = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    tokens = reference.conv1(pixels).flatten(2).transpose(1, 2)
    cls = reference.class_embedding.expand(2, 1, -1)
    hidden = reference.ln_pre(torch.cat([cls, tokens], dim=1) + reference.positional_embedding)
    for block in reference.transformer.resblocks[:-1]:
        hidden = block(hidden)
    torch.testing.assert_close(tower(x), hidden[:, 1:])
    assert tower(x).shape == (2, tower.num_patches, tower.width) == (2, 16, 32)
    assert len(tower.visual.transformer.resblocks) == 2  # the unused last block is gone


def test_vision_tower_refuses_what_it_cannot_use():
    with pytest.raises(ConfigError, match="outside the tower's 3 blocks"):
        visual = open_clip.model._build_vision_tower(TINY_VIT["embed_dim"], TINY_VIT["vision_cfg"])
        VisionTower(visual, mean=(0, 0, 0), std=(1, 1, 1), feature_layer=-4)
    resnet = open_clip.model._build_vision_tower(32, {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8})
    with pytest.raises(ConfigError, match="VisionTransformer"):
        VisionTower(resnet, mean=(0, 0, 0), std=(1, 1, 1))


def test_projector_is_llavas_mlp2x_gelu():
    projector = MLPProjector(32, 64)
    assert [type(m).__name__ for m in projector] == ["Linear", "GELU", "Linear"]
    assert (projector[0].in_features, projector[0].out_features, projector[2].out_features) == (32, 64, 64)


def test_create_vlm_from_an_open_clip_recipe_name():
    from dvd.models.clip import register_model_configs

    register_model_configs()
    model = create_vlm("dvd-tiny-vit", TINY_LLAMA, tokenizer=tiny_tokenizer())
    assert model.image_size == 32 and model.num_image_tokens == (32 // 4) ** 2
    assert model.vision_tower.open_clip_cfg == open_clip.get_model_config("dvd-tiny-vit")
    assert model.per_sample_nll(images(1), model.collate([make_conversation("What?", "red")])).shape == (1,)


def test_create_vlm_checks_the_tokenizer_fits_the_language_model():
    with pytest.raises(ConfigError, match="give tokenizer="):
        create_vlm(tiny_tower(), TINY_LLAMA)
    small = LlamaForCausalLM(
        LlamaConfig(vocab_size=8, **{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    )
    with pytest.raises(ConfigError, match="resize_token_embeddings"):
        create_vlm(tiny_tower(), small, tokenizer=tiny_tokenizer())


def test_language_model_names_fail_with_one_line_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set") as caught:
        create_vlm(tiny_tower(), "lmsys/vicuna-7b-v1.5")
    assert "\n" not in str(caught.value)
    with pytest.raises(FileNotFoundError, match="llava-hf/llava-1.5-7b-hf"):
        load_hf_llava("llava-hf/llava-1.5-7b-hf")


# --- checkpoints -----------------------------------------------------------------------------------
def test_saved_vlm_is_safetensors_plus_hf_directories_and_a_recipe(tmp_path):
    model = tiny_dvd_vlm()
    save_vlm(model, tmp_path / "vlm", metadata={"stage": 2})
    names = {p.relative_to(tmp_path / "vlm").as_posix() for p in (tmp_path / "vlm").rglob("*") if p.is_file()}
    assert {"dvd_vlm.json", "vision_tower.safetensors", "projector.safetensors", "lm/config.json"} <= names
    assert "lm/model.safetensors" in names and "tokenizer/tokenizer.json" in names
    recipe = json.loads((tmp_path / "vlm" / "dvd_vlm.json").read_text())
    assert recipe["kind"] == "dvd" and recipe["metadata"] == {"stage": 2}
    assert recipe["vision"]["open_clip_cfg"] == TINY_VIT and recipe["vision"]["feature_layer"] == -2
    assert recipe["versions"]["torch"]
    save_vlm(model, tmp_path / "vlm")  # overwriting leaves no temporary directories behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlm"]


def test_load_vlm_refuses_pickled_weights_and_missing_recipes(tmp_path):
    save_vlm(tiny_dvd_vlm(), tmp_path / "vlm")
    (tmp_path / "vlm" / "lm" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled weights"):
        load_vlm(tmp_path / "vlm")
    with pytest.raises(FileNotFoundError, match="dvd_vlm.json"):
        load_vlm(tmp_path / "nothing")


def test_a_tower_without_its_open_clip_config_cannot_be_saved(tmp_path):
    visual = open_clip.model._build_vision_tower(TINY_VIT["embed_dim"], TINY_VIT["vision_cfg"])
    tower = VisionTower(visual, mean=(0, 0, 0), std=(1, 1, 1))
    model = create_vlm(tower, TINY_LLAMA, tokenizer=tiny_tokenizer())
    with pytest.raises(ConfigError, match="open_clip_cfg="):
        save_vlm(model, tmp_path / "vlm")
    assert not (tmp_path / "vlm").exists()


def test_a_lora_wrapped_language_model_keeps_the_interface(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_dvd_vlm()
    batch, x = qa_batch(model), images(3)
    before, text = model.per_sample_nll(x, batch), model.generate(x, PROMPTS, max_new_tokens=4)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model.lm = peft.get_peft_model(model.lm, config)  # LoRA starts as the identity
    torch.testing.assert_close(model.per_sample_nll(x, batch), before)
    assert model.generate(x, PROMPTS, max_new_tokens=4) == text
    with pytest.raises(ConfigError, match="merge_and_unload"):
        save_vlm(model, tmp_path / "vlm")


# --- HF LLaVA adapter ------------------------------------------------------------------------------
def test_adapter_loss_equals_transformers_own_llava_loss():
    model = tiny_hf_llava()
    batch, x = qa_batch(model), images(3)
    pixels = (x - model.mean) / model.std
    reference = model.hf(
        input_ids=batch.input_ids,
        pixel_values=pixels,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
    ).loss
    torch.testing.assert_close(model(x, batch).loss, reference)


def test_adapter_generate_equals_transformers_own_greedy_generate():
    model = tiny_hf_llava()
    x = images(1)
    batch = model.collator().prompts(PROMPTS[:1])
    tokens = model.hf.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=(x - model.mean) / model.std,
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=model.tokenizer.eos_token_id,
        pad_token_id=model.tokenizer.pad_token_id,
    )[0, batch.input_ids.shape[1] :].tolist()
    eos = model.tokenizer.eos_token_id
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    expected = model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert model.generate(x, PROMPTS[:1], max_new_tokens=6) == [expected]


def test_load_hf_llava_reads_a_llava_hf_style_directory(tmp_path):
    from transformers import CLIPImageProcessor

    model = tiny_hf_llava()
    model.hf.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    CLIPImageProcessor(image_mean=mean, image_std=std, crop_size=IMAGE_SIZE).save_pretrained(tmp_path)
    loaded = load_hf_llava(str(tmp_path))
    assert not loaded.training
    torch.testing.assert_close(loaded.mean.flatten(), torch.tensor(mean))
    torch.testing.assert_close(loaded.std.flatten(), torch.tensor(std))
    x, batch = images(3), qa_batch(model)
    model.mean.copy_(loaded.mean)
    model.std.copy_(loaded.std)
    torch.testing.assert_close(loaded.per_sample_nll(x, batch), model.per_sample_nll(x, batch))


def test_adapter_needs_the_checkpoints_image_token_id():
    model = tiny_hf_llava()
    model.hf.config.image_token_id = 7
    with pytest.raises(ConfigError, match="<image> is id 4 but the LLaVA config expects 7"):
        HFLlava(model.hf, model.tokenizer)


def test_swapping_in_an_open_clip_tower_keeps_the_llavas_language_model():
    llava = tiny_hf_llava()
    swapped = llava_with_open_clip_tower(llava, tiny_tower())
    assert swapped.num_image_tokens == 16 and swapped.tokenizer is llava.tokenizer
    ids = llava.tokenizer(["what color is the circle?"], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(swapped.lm(input_ids=ids).logits, llava.hf(input_ids=ids).logits)
    assert (
        swapped.lm.get_input_embeddings().weight is llava.hf.get_input_embeddings().weight
    )  # shared, not copied
    out = swapped.per_sample_nll(images(3), qa_batch(swapped))
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_swap_can_keep_the_llava_projector_when_widths_match():
    llava = tiny_hf_llava()
    wide = {"embed_dim": 32, "vision_cfg": {**TINY_VIT["vision_cfg"], "width": 32}}
    swapped = llava_with_open_clip_tower(llava, tiny_tower(wide), keep_projector=True)
    old = llava.hf.model.multi_modal_projector
    assert torch.equal(swapped.projector[0].weight, old.linear_1.weight)
    assert torch.equal(swapped.projector[2].bias, old.linear_2.bias)
    narrow = {"embed_dim": 32, "vision_cfg": {**TINY_VIT["vision_cfg"], "width": 48}}
    with pytest.raises(ConfigError, match="width 32"):
        llava_with_open_clip_tower(llava, tiny_tower(narrow), keep_projector=True)
