"""``dvd train vlm``: stage 1 trains only the projector, stage 2 starts from it, Δ² steps train on images
inside the eps ball found with frozen parameters, LoRA and per-part learning rates, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dvd.cli import main as dvd_main
from dvd.config import ConfigError, load_config
from dvd.models.vlm import DvdVLM
from dvd.models.vlm_io import load_vlm
from dvd.train.attack import AttackSettings
from dvd.train.loop import StepInfo
from dvd.train.vlm import train_vlm
from dvd.train.vlm_config import VlmTrainConfig, check_config
from dvd.train.vlm_data import build_conversations, resolve_source
from dvd.train.vlm_model import build_vlm, optimizer_groups
from dvd.train.vlm_step import InstructionLoss, InstructionStep

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}
TINY_LM = (
    "lm={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 256}"
)
EPS = 4 / 255


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvd.data.shapesworld import generate

    root = tmp_path_factory.mktemp("vlm-world")
    generate(root / "sw", seed=0, size=200, image_size=32, eval_size=16, instruct_size=48)
    (root / "tiny_vit.json").write_text(json.dumps(TINY_VIT))
    return root


def tiny_args(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data={world / 'sw'}", f"output_dir={out}", f"vision={world / 'tiny_vit.json'}", TINY_LM,
        "template=vicuna_v1_short", "batch_size=8", "progress=false", "log_every=1", *extra,
    ]


def tiny_config(world: Path, out: Path, *extra: str) -> VlmTrainConfig:
    return check_config(load_config(VlmTrainConfig, None, tiny_args(world, out, *extra)))


def part_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "vision": load_file(str(folder / "vision_tower.safetensors")),
        "projector": load_file(str(folder / "projector.safetensors")),
        "lm": load_file(str(folder / "lm" / "model.safetensors")),
    }


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_trains_only_the_projector_and_stage2_starts_from_it_through_the_cli(world, tmp_path):
    first = tmp_path / "stage1"
    code = dvd_main(["train", "vlm", *tiny_args(world, first, "stage=1", "steps=3", "lr=1e-3")])
    assert code == 0
    cfg = tiny_config(world, first, "stage=1")
    start = build_vlm(cfg, resolve_source(cfg.data, cfg.data_format, cfg.image_root, 1))
    trained = part_weights(first / "final")
    assert same(trained["vision"], state_of(start.vision_tower))
    assert same(trained["lm"], {k: v for k, v in state_of(start.lm).items() if k in trained["lm"]})
    assert not same(trained["projector"], state_of(start.projector))

    second = tmp_path / "stage2"
    code = dvd_main(["train", "vlm", *tiny_args(world, second, "stage=2", f"init={first}", "steps=3")])
    assert code == 0
    tuned = part_weights(second / "final")
    assert same(tuned["vision"], trained["vision"])  # train_vision is off by default
    assert not same(tuned["lm"], trained["lm"]) and not same(tuned["projector"], trained["projector"])

    model = load_vlm(second / "final")
    assert isinstance(model, DvdVLM) and model.template.name == "vicuna_v1_short"
    answers = model.generate(torch.rand(2, 3, 32, 32), "What color is the circle?", max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    summary = json.loads((second / "summary.json").read_text())
    assert summary["step"] == 3 and summary["last"]["train/lr"] > 0


def adversarial_setup(world: Path, tmp_path: Path, *extra: str):
    cfg = tiny_config(world, tmp_path, "stage=2", "adversarial=true", "seed=3", *extra)
    source = resolve_source(cfg.data, cfg.data_format, cfg.image_root, 2)
    vlm = build_vlm(cfg, source)
    data = build_conversations(source, image_size=32, collator=vlm.collator(), caption_prompt="")
    images, batch = vlm.collator()([data[i] for i in range(4)])
    attack = AttackSettings(
        eps=EPS, step_size=3 / 255, random_start=True, warmup_steps=0, train_mode=True, seed=3
    )
    loss = InstructionLoss(model=InstructionStep(vlm), vlm=vlm, env=_env(), attack=attack, attack_steps=3)
    return vlm, loss, images, batch


def _env():
    from dvd.train.distributed import DistEnv

    return DistEnv()


def test_attack_touches_no_parameter_and_training_sees_images_inside_the_eps_ball(world, tmp_path):
    vlm, loss, images, batch = adversarial_setup(world, tmp_path)
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    before = state_of(vlm)
    adversarial = loss.adversarial_images(images, batch, StepInfo(0, 0, False))
    assert all(p.grad is None for p in vlm.parameters())
    assert {n for n, p in vlm.named_parameters() if p.requires_grad} == trainable
    assert same(state_of(vlm), before)

    seen = []
    vlm.vision_tower.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    out = loss((images, batch), StepInfo(0, 0, True))
    assert len(seen) == 3 + 1 + 1  # 3 attack steps, the training forward, a logging step's clean forward
    trained_on = seen[3]
    assert torch.equal(seen[4], images)
    assert torch.equal(trained_on, adversarial)  # seeded per (step, micro-batch): the same PGD images
    assert (trained_on - images).abs().max() <= EPS + 1e-6
    assert trained_on.min() >= 0 and trained_on.max() <= 1 and not torch.equal(trained_on, images)
    assert out["attack/loss_gain"] > 0 and out["loss"] > out["attack/clean_nll"] - 1e-6

    out["loss"].backward()
    adv_grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    vlm.zero_grad(set_to_none=True)
    vlm(adversarial, batch).loss.backward()  # a clean step on the adversarial images
    for name, grad in adv_grads.items():
        torch.testing.assert_close(grad, dict(vlm.named_parameters())[name].grad)


def test_gradient_checkpointing_gives_the_same_attack_and_gradients(world, tmp_path):
    grads = []
    for extra in ((), ("grad_checkpointing=true",)):
        vlm, loss, images, batch = adversarial_setup(world, tmp_path, "train_vision=true", *extra)
        assert vlm.vision_tower.visual.transformer.grad_checkpointing == bool(extra)
        assert vlm.lm.is_activation_checkpointing == bool(extra)
        out = loss((images, batch), StepInfo(1, 0, False))
        out["loss"].backward()
        grads.append({n: p.grad for n, p in vlm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("vision_tower") for k in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_lora_trains_adapters_with_per_part_learning_rates_and_saves_a_merged_model(world, tmp_path):
    cfg = tiny_config(world, tmp_path, "lora=true", "lora_r=4", "lora_alpha=8", "train_vision=true",
                      "lr=2e-4", "projector_lr=2e-5", "vision_lr=1e-6")
    vlm = build_vlm(cfg, resolve_source(cfg.data, cfg.data_format, cfg.image_root, 2))
    trainable = [n for n, p in vlm.named_parameters() if p.requires_grad]
    in_lm = [n for n in trainable if n.startswith("lm.")]
    assert in_lm and all("lora_" in n for n in in_lm)
    groups = optimizer_groups(vlm, lrs={"lm": 2e-4, "projector": 2e-5, "vision": 1e-6}, weight_decay=0.0)
    lrs = {g["name"].removesuffix("_no_decay"): g["lr"] for g in groups}
    assert lrs == {"lm": 2e-4, "projector": 2e-5, "vision": 1e-6}
    assert sum(len(g["params"]) for g in groups) == len(trainable)

    summary = train_vlm(
        tiny_config(world, tmp_path / "run", "lora=true", "lora_r=4", "lora_alpha=8", "steps=2")
    )
    model = load_vlm(summary["final"])
    assert not hasattr(model.lm, "peft_config")  # adapters merged into plain Llama weights
    assert not any("lora" in k for k in model.lm.state_dict())


def test_a_karpathy_split_file_gives_its_training_captions_as_stage1_samples(world, tmp_path):
    root = world / "sw"
    karpathy = root / "captions" / "karpathy_split.json"
    source = resolve_source(str(karpathy), "auto", str(root / "images"), 1)
    assert source.kind == "karpathy"
    cfg = tiny_config(world, tmp_path, "stage=1")
    vlm = build_vlm(cfg, resolve_source(cfg.data, cfg.data_format, cfg.image_root, 1))
    data = build_conversations(source, image_size=32, collator=vlm.collator(template="plain"),
                               caption_prompt="Describe the image briefly.")
    train = [e for e in json.loads(karpathy.read_text())["images"] if e["split"] in ("train", "restval")]
    assert len(data) == sum(len(e["sentences"]) for e in train)
    assert data[0]["conversations"][1]["value"] == train[0]["sentences"][0]["raw"]
    assert data[0]["image"].shape == (3, 32, 32) and data.skipped == 0


def test_each_conversation_is_tokenised_once_and_the_collator_reuses_it(world, tmp_path):
    cfg = tiny_config(world, tmp_path, "stage=2")
    source = resolve_source(cfg.data, cfg.data_format, cfg.image_root, 2)
    vlm = build_vlm(cfg, source)
    collator = vlm.collator()
    data = build_conversations(source, image_size=32, collator=collator, caption_prompt="")
    calls = []
    encode = collator.encode
    collator.encode = lambda turns: calls.append(1) or encode(turns)
    samples = [data[i] for i in range(4)]
    for _epoch in range(3):
        batch = collator([data[i] for i in range(4)])[1]
    assert len(calls) == 4  # the first read of each sample, never again (later epochs, collation)
    plain = [{"image": s["image"], "conversations": s["conversations"]} for s in samples]
    assert torch.equal(collator(plain)[1].input_ids, batch.input_ids)  # the same batch as encoding anew


def test_coco_captions_give_one_stage1_sample_per_reference_and_corrupt_images_are_skipped(world, tmp_path):
    root = world / "sw"
    source = resolve_source(str(root / "captions" / "annotations.json"), "auto", str(root / "images"), 1)
    assert source.kind == "coco"
    cfg = tiny_config(world, tmp_path, "stage=1")
    vlm = build_vlm(cfg, resolve_source(cfg.data, cfg.data_format, cfg.image_root, 1))
    data = build_conversations(source, image_size=32, collator=vlm.collator(template="plain"),
                               caption_prompt="Describe the image briefly.")
    captions = json.loads((root / "captions" / "annotations.json").read_text())["annotations"]
    assert len(data) == len(captions)
    first = data[0]
    assert (
        first["image"].shape == (3, 32, 32) and first["conversations"][1]["value"] == captions[0]["caption"]
    )

    broken = tmp_path / "images"
    import shutil

    shutil.copytree(root / "images", broken)
    victim = json.loads((root / "llava" / "stage1_captions.json").read_text())[0]["image"]
    (broken / victim).write_bytes(b"not a png")
    llava = resolve_source(str(root / "llava" / "stage1_captions.json"), "auto", str(broken), 1)
    data = build_conversations(
        llava, image_size=32, collator=vlm.collator(template="plain"), caption_prompt=""
    )
    assert len(list(data)) == len(data) - 1 and data.skipped == 1
    assert len(list(data)) == len(data) - 1 and data.skipped == 1  # a second epoch counts it once
    kept = build_conversations(llava, image_size=32, collator=vlm.collator(template="plain"),
                               caption_prompt="", in_memory=True)
    assert len(list(kept)) == len(kept) - 1 and kept.skipped == 1  # likewise when decoded once


def test_in_memory_decodes_each_image_once_and_gives_the_samples_read_from_disk(world, tmp_path, monkeypatch):
    import dvd.data.image_text as image_text

    cfg = tiny_config(world, tmp_path, "stage=2")
    source = resolve_source(cfg.data, cfg.data_format, cfg.image_root, 2)
    collator = build_vlm(cfg, source).collator()
    decoded = []
    decode = image_text.decode_image
    monkeypatch.setattr(image_text, "decode_image", lambda *a, **k: decoded.append(1) or decode(*a, **k))
    disk = build_conversations(source, image_size=32, collator=collator, caption_prompt="")  # LLaVA's crop
    kept = build_conversations(source, image_size=32, collator=collator, caption_prompt="", in_memory=True)
    assert len(decoded) == len(kept)  # every image once, when the set is built
    for _epoch in range(2):
        for i in range(len(kept)):
            ours, theirs = kept[i], disk[i]
            assert torch.equal(ours["image"], theirs["image"])
            assert ours["conversations"] == theirs["conversations"]
    assert len(decoded) == 3 * len(kept)  # reading from disk decoded again in each epoch; memory never
    crops = build_conversations(source, image_size=32, collator=collator, caption_prompt="", augment=True)
    assert not all(torch.equal(crops[0]["image"], crops[0]["image"]) for _ in range(5))  # a crop per read


def test_conversation_lengths_come_from_the_text_alone_and_match_the_collated_tokens(world, tmp_path,
                                                                                     monkeypatch):
    import dvd.data.image_text as image_text

    cfg = tiny_config(world, tmp_path, "stage=2")
    source = resolve_source(cfg.data, cfg.data_format, cfg.image_root, 2)
    collator = build_vlm(cfg, source).collator()
    data = build_conversations(source, image_size=32, collator=collator, caption_prompt="")
    decoded = []
    decode = image_text.decode_image
    monkeypatch.setattr(image_text, "decode_image", lambda *a, **k: decoded.append(1) or decode(*a, **k))
    lengths = data.lengths()
    assert not decoded and len(lengths) == len(data) and len(set(lengths)) > 1
    for i in range(len(data)):
        _, batch = collator([data[i]])
        assert batch.input_ids.shape[1] == lengths[i]


def test_conversation_lengths_raise_a_configuration_error_as_reading_a_sample_does(world, tmp_path):
    cfg = tiny_config(world, tmp_path, "stage=2")
    source = resolve_source(cfg.data, cfg.data_format, cfg.image_root, 2)
    collator = build_vlm(cfg, source).collator(max_length=2)  # cuts the image tokens
    data = build_conversations(source, image_size=32, collator=collator, caption_prompt="")
    for read in (data.lengths, lambda: data[0]):
        with pytest.raises(ConfigError, match="raise max_length"):
            read()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stage=1", "train_lm=true"], "stage 1 trains only the projector"),
        (["adversarial=true", "eps=4"], "write 4/255"),
        (["data_format=lava"], "did you mean 'llava'"),
        (["init=/nonexistent/run"], "run stage 1 first"),
        (["data=/nonexistent/world"], "no such data file"),
        (["weight_decay=-1"], "weight_decay must be a number >= 0"),
        (["augment=true", "in_memory=true"], "set augment=false or in_memory=false"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_fix(args, message, world, tmp_path, capsys):
    assert dvd_main(["train", "vlm", *tiny_args(world, tmp_path, "steps=1", *args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dvd: error:") and message in err and "\n" not in err


def test_config_error_for_an_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="attack_steps"):
        load_config(VlmTrainConfig, None, ["attack_step=3"])


def test_vision_tower_starts_from_a_dvd_clip_checkpoint_folder(world, tmp_path):
    from dvd.models.clip import create_clip, save_clip

    torch.manual_seed(5)
    clip = create_clip(str(world / "tiny_vit.json"))
    save_clip(clip, tmp_path / "clip")
    cfg = tiny_config(world, tmp_path, "stage=1", f"vision={tmp_path / 'clip'}")
    vlm = build_vlm(cfg, resolve_source(cfg.data, cfg.data_format, cfg.image_root, 1))
    ours = vlm.vision_tower.visual.state_dict()
    theirs = clip.model.visual.state_dict()
    assert ours and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    torch.testing.assert_close(vlm.vision_tower.mean.flatten(), torch.tensor(clip.preprocess_cfg["mean"]))


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parents[1].glob("configs/vlm_*.yaml")), ids=lambda p: p.name
)
def test_shipped_vlm_recipes_are_valid_configs(path):
    cfg = check_config(load_config(VlmTrainConfig, path))
    assert cfg.stage in (1, 2) and (cfg.init is None) == (cfg.stage == 1)
    if "llava15_7b" in path.name:
        assert (
            cfg.adversarial and cfg.eps == "4/255" and cfg.attack_steps == 3 and cfg.attack_loss_scale == 128
        )
        assert cfg.precision == "bf16" and cfg.max_length == 2048 and cfg.warmup_ratio == 0.03
        if cfg.stage == 1:
            assert (cfg.lr, cfg.batch_size * 8) == (1e-3, 256)
        else:
            assert (cfg.lora_r, cfg.lora_alpha, cfg.lr, cfg.projector_lr, cfg.vision_lr) == (
                128,
                256,
                2e-4,
                2e-5,
                1e-6,
            )
            assert cfg.train_vision and cfg.batch_size * 8 == 128


def tiny_hf_llava_folder(world: Path, folder: Path) -> Path:
    """A random tiny ``LlavaForConditionalGeneration`` saved like a published LLaVA checkpoint."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from dvd.models.vlm_tokenizer import ensure_image_token
    from dvd.train.vlm_data import shapesworld_tokenizer

    torch.manual_seed(0)
    tokenizer = shapesworld_tokenizer(world / "sw")
    image_id = ensure_image_token(tokenizer)
    layers = {"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32}
    vision = CLIPVisionConfig(image_size=32, patch_size=8, **layers)
    text = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, num_key_value_heads=2, max_position_embeddings=256, **layers,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def test_a_published_llava_checkpoint_is_tuned_adversarially_with_lora_on_its_language_model(world, tmp_path):
    from dvd.models.vlm_hf import HFLlava

    folder = tiny_hf_llava_folder(world, tmp_path / "llava-hf")
    args = [f"init=hf-llava:{folder}", "lora=true", "lora_r=4", "lora_alpha=8", "train_vision=true"]
    cfg = tiny_config(
        world, tmp_path / "run", "adversarial=true", "steps=2", "grad_checkpointing=true", *args
    )
    vlm = build_vlm(cfg, resolve_source(cfg.data, cfg.data_format, cfg.image_root, 2))
    lora = [n for n, p in vlm.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for n, p in vlm.named_parameters() if n in lora)
    assert all("language_model" in n for n in lora)  # not the vision tower or the projector
    assert all(p.requires_grad for p in vlm.param_groups()["vision"])

    summary = train_vlm(cfg)
    model = load_vlm(summary["final"])
    assert isinstance(model, HFLlava) and not any("lora" in k for k in model.state_dict())
    assert len(model.generate(torch.rand(1, 3, 32, 32), "What color is the circle?", max_new_tokens=2)) == 1


def test_an_lm_with_tied_embeddings_checkpoints_and_resumes(world, tmp_path):
    gpt2 = "lm={model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2, n_positions: 256}"
    first = train_vlm(tiny_config(world, tmp_path, gpt2, "steps=2", "checkpoint_every=1", "stop_at=1"))
    assert first["step"] == 1 and first["final"] is None
    rest = train_vlm(tiny_config(world, tmp_path, gpt2, "steps=2", "checkpoint_every=1", "resume=latest"))
    assert rest["resumed_from"] == 1 and rest["step"] == 2
    model = load_vlm(rest["final"])
    assert model.lm.lm_head.weight.data_ptr() == model.lm.get_input_embeddings().weight.data_ptr()
