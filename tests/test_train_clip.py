"""`dvd train clip`: every recipe trains on a tiny ShapesWorld, ΔCLIP's attack does no weight work,
checkpoints load in plain open_clip, and bad settings are one clear error."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.constants import IMAGENET_MEAN, OPENAI_DATASET_MEAN
from safetensors.torch import load_file

from dvd.config import ConfigError, load_config
from dvd.models.clip import load_clip
from dvd.train.attack import AttackSettings
from dvd.train.clip import train_clip
from dvd.train.clip_config import ClipTrainConfig, check_config
from dvd.train.clip_losses import ContrastiveLoss, ContrastiveStep
from dvd.train.clip_resolution import InterpolatedPositions, Phase, Resolution, build_phases
from dvd.train.distributed import DistEnv
from dvd.train.loop import StepInfo

TINY = ["model=dvd-tiny-vit", "batch_size=8", "progress=false", "warmup_steps=1", "shuffle_buffer=16"]


def run(shapesworld: Path, out: Path, *overrides: str) -> dict:
    cfg = load_config(ClipTrainConfig, None, [f"data={shapesworld}", f"output_dir={out}", *TINY, *overrides])
    return train_clip(cfg)


@pytest.fixture(scope="module")
def clean_clip(shapesworld: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    summary = run(shapesworld, out, "recipe=clean", "steps=3", "checkpoint_every=3")
    return Path(summary["final"])


def open_clip_features(folder: Path, images: torch.Tensor) -> torch.Tensor:
    """Image embeddings computed by plain open_clip from a saved folder (normalisation done by hand)."""
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_image((images - mean) / std), dim=-1)


# ------------------------------------------------------------------------------------------ recipes


def test_clean_recipe_exports_a_folder_plain_open_clip_loads_with_identical_embeddings(clean_clip):
    images = torch.rand(4, 3, 32, 32)
    ours = load_clip(clean_clip)
    with torch.no_grad():
        expected = ours.encode_image(images)
    assert torch.equal(open_clip_features(clean_clip, images), expected)


def test_delta_trains_checkpoints_logs_attack_and_evaluates(shapesworld, tmp_path):
    summary = run(
        shapesworld, tmp_path, "recipe=delta", "steps=4", "attack_steps=2", "checkpoint_every=2",
        "log_every=2", "eval_every=4", "eval_tasks=color", "eval_samples=8", "eval_attack_steps=2",
        "keep_last=1",
    )
    assert summary["step"] == 4 and summary["skipped_steps"] == 0
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert checkpoints == ["step-000000004"]  # keep_last=1 pruned step 2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000000004"
    for name in ("config.json", "versions.json", "train_state.pt", "open_clip_model.safetensors"):
        assert (tmp_path / "checkpoints" / "step-000000004" / name).is_file()
    # the checkpoint itself is an open_clip folder with the final weights
    final = load_file(str(tmp_path / "final" / "open_clip_model.safetensors"))
    saved = load_file(str(tmp_path / "checkpoints" / "step-000000004" / "open_clip_model.safetensors"))
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/images_per_s",
        "train/attack/loss_gain",
        "train/attack/success",
        "eval/color/clean",
        "eval/color/robust",
    ):
        assert tag in tags, tag
    gain = events.Scalars("train/attack/loss_gain")
    assert all(event.value > 0 for event in gain)  # PGD raised the contrastive loss of the batch
    rows = __import__("json").loads((tmp_path / "eval.json").read_text())
    assert rows[0]["dataset"] == "shapesworld/color" and rows[0]["attack"] == "pgd" and rows[0]["n"] == 8


@pytest.mark.parametrize("recipe", ["tecoa", "fare"])
def test_finetuning_recipes_train_only_the_image_tower(recipe, shapesworld, clean_clip, tmp_path):
    summary = run(
        shapesworld,
        tmp_path,
        f"recipe={recipe}",
        f"pretrained={clean_clip}",
        "steps=2",
        "attack_steps=2",
        "checkpoint_every=2",
        "lr=1e-3",
        "log_every=1",
        "task=shape",
    )
    before = load_file(str(clean_clip / "open_clip_model.safetensors"))
    after = load_file(str(Path(summary["final"]) / "open_clip_model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    assert torch.equal(before["logit_scale"], after["logit_scale"])


def test_resolution_phases_train_low_res_then_full_res_and_keep_a_full_size_embedding(shapesworld, tmp_path):
    phases = (
        "phases=[{steps: 2, image_size: 16, attack_steps: 1}, {steps: 1, image_size: 32, attack_steps: 2}]"
    )
    summary = run(shapesworld, tmp_path, "recipe=delta", "steps=3", "checkpoint_every=3", phases)
    weights = load_file(str(Path(summary["final"]) / "open_clip_model.safetensors"))
    assert weights["visual.positional_embedding"].shape == (1 + 8 * 8, 64)
    assert not any("parametrizations" in k for k in weights)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            open_clip_features(Path(summary["final"]), images),
            load_clip(summary["final"]).encode_image(images),
        )


# ------------------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ("steps=4", "trained with steps=2 but this run has steps=4: the lr schedule is fixed"),
        ("warmup_steps=2", "trained with warmup_steps=1 but this run has warmup_steps=2: the lr schedule"),
        ("lr=1e-3", "trained with lr=[0.0005, 0.0005] but this run has lr=[0.001, 0.001]: the lr schedule"),
    ],
)
def test_resuming_with_another_schedule_is_refused_with_the_reason(changed, message, shapesworld, tmp_path):
    run(shapesworld, tmp_path, "recipe=clean", "steps=2", "checkpoint_every=2")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(shapesworld, tmp_path, "recipe=clean", "steps=2", "resume=latest", changed)


@pytest.mark.parametrize(
    ("normalization", "mean"),
    [("model", OPENAI_DATASET_MEAN), ("openai", OPENAI_DATASET_MEAN),
     ("imagenet", IMAGENET_MEAN)],
)
def test_the_recipe_normalization_is_a_setting_saved_with_the_model(
    normalization, mean, shapesworld, tmp_path
):
    summary = run(shapesworld, tmp_path, "recipe=clean", "steps=1", f"normalization={normalization}")
    saved = load_clip(summary["final"])
    assert saved.preprocess_cfg["mean"] == pytest.approx(list(mean))
    assert saved.mean.flatten().tolist() == pytest.approx(list(mean))


def test_an_unknown_normalization_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="did you mean 'imagenet'"):
        check_config(_cfg("normalization=imagenett"))


def test_interpolated_positions_are_identity_at_native_size_and_differentiable_when_smaller():
    positions = InterpolatedPositions((4, 4))
    full = torch.randn(17, 8, requires_grad=True)
    assert positions(full) is full
    positions.grid = (2, 2)
    small = positions(full)
    assert small.shape == (5, 8) and torch.equal(small[0], full[0])
    small.sum().backward()
    assert full.grad is not None and full.grad.shape == full.shape


def _delta_setup(recipe_steps: int = 2):
    from dvd.models.clip import create_clip

    torch.manual_seed(0)
    clip = create_clip("dvd-tiny-vit")
    step = ContrastiveStep(clip).train()
    phases = [Phase(0, 10, 32, recipe_steps)]
    attack = AttackSettings(
        eps=8 / 255, step_size=None, random_start=True, warmup_steps=0, train_mode=False, seed=0
    )
    loss = ContrastiveLoss(
        model=step,
        clip=clip,
        env=DistEnv(),
        phases=phases,
        resolution=Resolution(clip, phases),
        attack=attack,
        clean_loss_weight=0.0,
        local_loss=True,
        gather_with_grad=True,
    )
    images = torch.rand(6, 3, 32, 32)
    tokens = clip.tokenize([f"a photo of {i} red circles." for i in range(6)])
    return clip, step, loss, images, tokens


def test_delta_attack_accumulates_no_parameter_gradient():
    clip, step, loss, images, tokens = _delta_setup()
    with torch.no_grad():
        text = clip.encode_text(tokens)
    adversarial = loss._attack(images, text, steps=3, info=StepInfo(0, 0, False))
    assert all(p.grad is None for p in clip.parameters())
    assert all(p.requires_grad for p in clip.parameters())  # unfrozen again afterwards
    assert (adversarial - images).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(adversarial, images)


def test_delta_step_gradient_equals_a_clean_step_on_the_adversarial_batch():
    clip, step, loss, images, tokens = _delta_setup()
    attack = functools.partial(loss._attack, steps=2, info=StepInfo(0, 0, False))
    out = step(images, tokens, attack=attack)
    loss.clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    delta_grads = {n: p.grad.clone() for n, p in clip.named_parameters()}
    clip.zero_grad(set_to_none=True)
    again = step(out["images"], tokens)
    loss.clip_loss(again["image_features"], again["text_features"], again["logit_scale"]).backward()
    for name, p in clip.named_parameters():
        assert torch.equal(delta_grads[name], p.grad), name


def test_delta_logging_step_reports_attack_success_and_gain():
    clip, step, loss, images, tokens = _delta_setup()
    result = loss((images, tokens), StepInfo(0, 0, True))
    assert result["loss"].requires_grad
    assert 0.0 <= result["attack/success"] <= 1.0 and result["attack/loss_gain"] > 0


def test_eps_warms_up_linearly_and_step_size_follows_the_documented_rule():
    attack = AttackSettings(
        eps=4 / 255, step_size=None, random_start=True, warmup_steps=4, train_mode=False, seed=0
    )
    assert [round(attack.eps_at(s) * 255, 6) for s in range(6)] == [1, 2, 3, 4, 4, 4]
    assert attack.step_size_for(4 / 255, 1) == pytest.approx(1.25 * 4 / 255)
    assert attack.step_size_for(4 / 255, 3) == pytest.approx(2.5 * 4 / 255 / 3)


# ------------------------------------------------------------------------------------------ errors


def _cfg(*overrides: str) -> ClipTrainConfig:
    return load_config(ClipTrainConfig, None, ["data=somewhere", *overrides])


def test_augment_false_trains_on_the_images_exactly_as_stored_and_true_crops_them(shapesworld):
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from dvd.models.clip import create_clip
    from dvd.train.clip_data import build_dataset, shapesworld_shards

    clip = create_clip("dvd-tiny-vit")
    with tarfile.open(shapesworld_shards(shapesworld)[0]) as tar:
        stored = {
            Path(m.name).stem: np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
            for m in tar.getmembers()
            if m.name.endswith(".png")
        }
    as_tensor = [torch.tensor(a).permute(2, 0, 1).float().div(255) for a in stored.values()]
    stored_images = {t.numpy().tobytes() for t in as_tensor}
    for augment in (False, True):
        cfg = load_config(ClipTrainConfig, None, [f"data={shapesworld}", "recipe=clean", "shuffle_buffer=0",
                                                  f"augment={str(augment).lower()}"])
        dataset, _, _ = build_dataset(cfg, clip)
        images = [image for image, _ in itertools.islice(iter(dataset), 8)]
        exact = [image.numpy().tobytes() in stored_images for image in images]
        # random crops resample most images (a crop of the whole image can come out unchanged)
        assert all(exact) if not augment else sum(exact) <= len(exact) // 2, (augment, exact)


@pytest.mark.parametrize("recipe", ["clean", "fare"])
def test_in_memory_keeps_streamed_samples_bit_for_bit_and_reads_epochs_in_seeded_order(recipe, shapesworld):
    from dvd.models.clip import create_clip
    from dvd.train.clip_data import build_dataset, make_loader_factory

    clip = create_clip("dvd-tiny-vit")
    common = [f"data={shapesworld}", f"recipe={recipe}", "augment=false", "batch_size=4", "pretrained=x"]
    streamed, _, _ = build_dataset(load_config(ClipTrainConfig, None, [*common, "shuffle_buffer=0"]), clip)
    cfg = check_config(load_config(ClipTrainConfig, None, [*common, "in_memory=true"]))
    kept, collate, _ = build_dataset(cfg, clip)
    pairs = list(streamed)
    assert len(kept) == len(pairs) and kept.images.dtype == torch.uint8
    for (image, target), i in zip(pairs, range(len(kept)), strict=True):
        assert torch.equal(kept[i][0], image) and kept[i][1] == target  # bit for bit, nothing lost

    make = make_loader_factory(kept, cfg=cfg, env=DistEnv(), collate=collate)
    def epoch(segment):
        return torch.cat([b if recipe == "fare" else b[0] for b in make(segment)]).flatten(1)

    first, again, second = epoch(0), epoch(0), epoch(1)
    assert torch.equal(first, again) and not torch.equal(first, second)  # seeded, reshuffled per epoch
    assert sorted(map(bytes, first.numpy())) == sorted(map(bytes, second.numpy()))  # the same samples


def test_in_memory_pairs_tokenise_each_caption_once_and_give_the_tokenizer_s_ids(shapesworld):
    from dvd.models.clip import create_clip
    from dvd.train.clip_data import PairCollate, build_dataset

    clip = create_clip("dvd-tiny-vit")
    common = [f"data={shapesworld}", "recipe=clean", "augment=false", "pretrained=x"]
    _, streamed_collate, _ = build_dataset(load_config(ClipTrainConfig, None, common), clip)
    cfg = check_config(load_config(ClipTrainConfig, None, [*common, "in_memory=true"]))
    kept, collate, _ = build_dataset(cfg, clip)
    assert streamed_collate.memo is None and collate.memo == {}  # a stream's captions rarely repeat
    calls = []
    collate.tokenizer = lambda texts: calls.append(list(texts)) or clip.tokenizer(texts)
    items = [kept[i] for i in range(6)]
    batches = [items[:4], items[2:], items[:4]]  # overlapping, then the first again
    for batch in batches:
        _, tokens = collate(batch)
        assert torch.equal(tokens, clip.tokenizer([text for _, text in batch]))
    seen = [text for call in calls for text in call]
    assert len(seen) == len(set(seen)) == len({text for _, text in items})  # each caption once
    assert PairCollate(clip.tokenizer)(items[:2])[1].shape == (2, clip.tokenizer(["x"]).shape[1])


def test_in_memory_trains_and_refuses_what_it_cannot_keep(shapesworld, tmp_path):
    summary = run(shapesworld, tmp_path, "recipe=clean", "steps=2", "augment=false", "in_memory=true")
    assert summary["step"] == 2
    for clash in ("augment=true", "resampled=true", "batch_group_by=[color]"):
        with pytest.raises(ConfigError, match="in_memory=true reads the set once.*turn it off"):
            check_config(_cfg("in_memory=true", "augment=false", clash))


def test_in_memory_refuses_images_that_are_not_8_bit():
    from dvd.data.in_memory import InMemory

    assert torch.equal(InMemory([(torch.full((3, 2, 2), 7 / 255), 0)])[0][0], torch.full((3, 2, 2), 7 / 255))
    with pytest.raises(ValueError, match="not multiples of 1/255"):
        InMemory([(torch.full((3, 2, 2), 0.5), 0)])


def test_unknown_recipe_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'delta'"):
        check_config(_cfg("recipe=detla"))


def test_finetuning_without_a_pretrained_model_names_the_fix():
    with pytest.raises(ConfigError, match="pretrained="):
        check_config(_cfg("recipe=tecoa"))


def test_an_unknown_model_name_suggests_the_closest_few_not_every_open_clip_name(
    shapesworld, tmp_path, capsys
):
    from dvd.cli import main as dvd_main

    args = [f"data={shapesworld}", f"output_dir={tmp_path}", *TINY, "model=nosuch", "steps=1"]
    assert dvd_main(["train", "clip", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dvd: error: unknown CLIP model 'nosuch' (closest of ") and "\n" not in err
    assert len(err) < 400, err


def test_negative_weight_decay_is_refused():
    with pytest.raises(ConfigError, match="weight_decay must be a number >= 0, got -1"):
        check_config(_cfg("weight_decay=-1"))


def test_eps_above_one_without_unit_is_refused():
    with pytest.raises(ConfigError, match="/255"):
        check_config(_cfg("eps=4"))


def test_phases_must_add_up_to_the_steps_and_fit_the_patch_grid():
    from dvd.models.clip import create_clip

    clip = create_clip("dvd-tiny-vit")
    cfg = check_config(_cfg("steps=10", "phases=[{steps: 4, image_size: 16}, {steps: 4, image_size: 32}]"))
    with pytest.raises(ConfigError, match="add up to 8 steps but steps=10"):
        build_phases(cfg, clip)
    cfg = check_config(_cfg("steps=4", "phases=[{steps: 4, image_size: 18}]"))
    with pytest.raises(ConfigError, match="multiple of the patch size 4"):
        build_phases(cfg, clip)


def test_missing_data_root_is_a_one_line_error(tmp_path):
    cfg = load_config(ClipTrainConfig, None, [f"data={tmp_path}", f"output_dir={tmp_path / 'o'}", *TINY])
    with pytest.raises(FileNotFoundError, match="neither a ShapesWorld root"):
        train_clip(cfg)


def test_csv_pairs_train_and_a_corrupt_image_is_skipped_not_fatal(shapesworld, tmp_path):
    import json

    annotations = json.loads((shapesworld / "captions" / "annotations.json").read_text())
    captions = {a["image_id"]: a["caption"] for a in annotations["annotations"]}
    rows = [f"{image['file_name']}\t{captions[image['id']]}" for image in annotations["images"][:17]]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows.append(f"{tmp_path / 'broken.png'}\ta broken image.")
    (tmp_path / "pairs.csv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    summary = run(
        tmp_path / "pairs.csv", tmp_path / "out", "recipe=delta", "steps=3", "checkpoint_every=3",
        "attack_steps=1", f"csv_image_root={shapesworld / 'images'}",
    )
    assert summary["step"] == 3 and summary["skipped_steps"] == 0
