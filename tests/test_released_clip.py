"""Released robust CLIPs load exactly: ΔCLIP hub repos (offline hub cache, real repo names) and
RobustVLM's vision-tower-only TeCoA/FARE files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dvd.config import ConfigError
from dvd.models.clip import create_clip, load_clip, save_clip
from dvd.models.delta_tokenizer import VOCAB_NAME, DeltaTokenizer

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# A tiny ΔCLIP-shaped config: BERT vocabulary, [CLS]-last pooling, the fork's vocab_path field.
DELTA_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 30522,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "pool_type": "last",
        "no_causal_mask": True,
        "vocab_path": "/home/authors/big_vision/bert_base_vocab_bos_eos.txt",
    },
}
HASH = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path) -> Path:
    """huggingface_hub reads only ``tmp/hub``, as with HF_HUB_OFFLINE=1 HF_HUB_CACHE=tmp/hub."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def plain_open_clip(model_cfg: dict) -> torch.nn.Module:
    """What open_clip builds from the config without dvd's fields (the reference for features)."""
    cfg = copy.deepcopy(model_cfg)
    cfg["text_cfg"].pop("vocab_path", None)
    torch.manual_seed(0)
    return open_clip.model.CLIP(**cfg).eval()


def publish(cache: Path, repo: str, model_cfg: dict, *, weights: str, state: dict) -> Path:
    """A hub repo in huggingface_hub's cache layout: refs/main -> snapshots/<hash>/files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / HASH
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(HASH)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {**IMAGENET, "interpolation": "bicubic"}}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / weights))
    else:
        torch.save(state, snapshot / weights)
    return snapshot


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return plain_open_clip(DELTA_CFG)


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
@pytest.mark.parametrize("repo", ["zw123/delta_clip_h14_336", "zw123/delta_clip_l14_224"])
def test_delta_clip_hub_repo_builds_with_the_authors_tokenizer(offline_hub, reference, repo, weights) -> None:
    publish(offline_hub, repo, DELTA_CFG, weights=weights, state=reference.state_dict())
    clip = create_clip(f"hf-hub:{repo}")
    assert isinstance(clip.tokenizer, DeltaTokenizer)
    ids = clip.tokenize(["a photo of a cat.", ""])
    assert ids.tolist() == [
        [1, 1037, 6302, 1997, 1037, 4937, 1012, 2] + [0] * 7 + [101],
        [1, 2] + [0] * 13 + [101],
    ]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_text(ids), dim=-1)
        assert torch.allclose(clip.encode_text(ids), expected, atol=1e-6)
    assert clip.mean.flatten().tolist() == pytest.approx(IMAGENET["mean"])  # ImageNet normalisation
    assert clip.model.attn_mask is None  # no_causal_mask from the config is honoured


def test_delta_clip_without_vocab_path_is_recognised_by_its_name(offline_hub, reference) -> None:
    cfg = copy.deepcopy(DELTA_CFG)
    del cfg["text_cfg"]["vocab_path"]
    snapshot = publish(offline_hub, "zw123/delta_clip_l14_336", cfg, weights="open_clip_model.safetensors",
                       state=reference.state_dict())
    for spec in ("hf-hub:zw123/delta_clip_l14_336", str(snapshot)):  # the snapshot dir's name is a hash
        clip = create_clip(spec)
        assert isinstance(clip.tokenizer, DeltaTokenizer)
        assert clip.tokenize("a cat")[0, :4].tolist() == [1, 1037, 4937, 2]


def test_snapshot_directory_and_local_dir_load_the_same_model(offline_hub, reference) -> None:
    snapshot = publish(offline_hub, "zw123/delta_clip_h14_336", DELTA_CFG,
                       weights="open_clip_model.safetensors", state=reference.state_dict())
    for spec in (str(snapshot), f"local-dir:{snapshot}"):
        clip = create_clip(spec)
        assert isinstance(clip.tokenizer, DeltaTokenizer)  # the vocab_path field says so
        assert clip.tokenize("a cat")[0, :4].tolist() == [1, 1037, 4937, 2]


def test_saved_delta_clip_keeps_its_tokenizer_and_features(offline_hub, reference, tmp_path) -> None:
    publish(offline_hub, "zw123/delta_clip_h14_336", DELTA_CFG, weights="open_clip_model.safetensors",
            state=reference.state_dict())
    clip = create_clip("hf-hub:zw123/delta_clip_h14_336")
    out = save_clip(clip, tmp_path / "saved")
    assert (out / VOCAB_NAME).is_file()
    saved = json.loads((out / "open_clip_config.json").read_text())
    assert saved["model_cfg"]["text_cfg"]["vocab_path"] == VOCAB_NAME
    back = load_clip(out)
    texts = ["a photo of a dog.", "Straße 中国"]
    assert isinstance(back.tokenizer, DeltaTokenizer)
    assert torch.equal(back.tokenize(texts), clip.tokenize(texts))
    with torch.no_grad():
        assert torch.equal(back.encode_text(back.tokenize(texts)), clip.encode_text(clip.tokenize(texts)))


def test_unknown_config_fields_are_one_line_errors_naming_the_field(offline_hub, reference) -> None:
    for section, field in (("text_cfg", "bert_flavour"), ("vision_cfg", "patch_merge"), (None, "frobnicate")):
        cfg = copy.deepcopy(DELTA_CFG)
        (cfg[section] if section else cfg)[field] = 1
        repo = f"zw123/delta_clip_{field}"
        publish(offline_hub, repo, cfg, weights="open_clip_model.safetensors", state=reference.state_dict())
        with pytest.raises(ConfigError) as error:
            create_clip(f"hf-hub:{repo}")
        message = str(error.value)
        assert f"model_cfg.{section + '.' if section else ''}{field}" in message and "\n" not in message


def test_plain_open_clip_hub_repo_still_uses_open_clip(offline_hub) -> None:
    cfg = copy.deepcopy(DELTA_CFG)
    cfg["text_cfg"].update(vocab_size=49408, pool_type="argmax", no_causal_mask=False)
    del cfg["text_cfg"]["vocab_path"]
    publish(offline_hub, "chs20/fare2-clip", cfg, weights="open_clip_pytorch_model.bin",
            state=plain_open_clip(cfg).state_dict())
    clip = create_clip("hf-hub:chs20/fare2-clip")
    assert isinstance(clip.tokenizer, open_clip.tokenizer.SimpleTokenizer)
    assert clip.tokenize("a cat")[0, 0].item() == 49406  # CLIP's <start_of_text>


def test_missing_hub_repo_offline_is_one_line(offline_hub) -> None:
    with pytest.raises(ConfigError) as error:
        create_clip("hf-hub:chs20/tecoa4-clip")
    assert "unreachable" in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------ RobustVLM vision-tower files


@pytest.fixture(scope="module")
def base_and_tower(tmp_path_factory):
    torch.manual_seed(0)
    base = create_clip("dvd-tiny-vit")
    generator = torch.Generator().manual_seed(1)  # "fine-tuned": every image-tower tensor moved
    visual = base.model.visual.state_dict()
    tuned = {k: v + torch.randn(v.shape, generator=generator) for k, v in visual.items()}
    return base, tuned


@pytest.mark.parametrize("layout", ["plain", "tecoa", "prefixed", "safetensors"])
def test_vision_weights_replace_only_the_image_tower(base_and_tower, tmp_path, layout) -> None:
    base, tower = base_and_tower
    path = tmp_path / ("fare.safetensors" if layout == "safetensors" else "fare_eps_4.pt")
    if layout == "safetensors":
        save_file(tower, str(path))
    else:
        state = {"plain": tower, "tecoa": {"vision_encoder_state_dict": tower},
                 "prefixed": {f"module.{k}": v for k, v in tower.items()}}[layout]
        torch.save(state, path)
    torch.manual_seed(0)  # the same random init as ``base``
    clip = create_clip("dvd-tiny-vit", vision_weights=path)
    state, base_state = clip.model.state_dict(), base.model.state_dict()
    for key, value in tower.items():
        assert torch.equal(state[f"visual.{key}"], value)
        assert not torch.equal(base_state[f"visual.{key}"], value)
    text_keys = [k for k in state if not k.startswith("visual.")]
    assert text_keys and all(torch.equal(state[k], base_state[k]) for k in text_keys)


def test_vision_weights_that_are_not_plain_tensors_are_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"vision_encoder_state_dict": {"w": torch.zeros(1)}, "opt": Path("x")}, path)
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        create_clip("dvd-tiny-vit", vision_weights=path)


def test_vision_weights_for_another_architecture_name_the_mismatch(tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(1, 2, 3, 3)}, path)
    with pytest.raises(ConfigError, match="do not fit this model's image tower") as error:
        create_clip("dvd-tiny-vit", vision_weights=path)
    assert "\n" not in str(error.value)


def test_tokenize_takes_one_text_as_one_row(base_and_tower) -> None:
    base, _ = base_and_tower
    one = base.tokenize("a photo of a cat")
    assert one.shape[0] == 1 and torch.equal(one, base.tokenize(["a photo of a cat"]))
