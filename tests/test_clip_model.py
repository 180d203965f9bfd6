"""dvd.models.clip: [0, 1] inputs, normalisation inside, open_clip-compatible checkpoints, clear errors."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from dvd.config import ConfigError
from dvd.models.clip import (
    CONFIG_NAME,
    MODEL_CONFIG_DIR,
    WEIGHTS_NAME,
    DvdCLIP,
    create_clip,
    load_clip,
    save_clip,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Payload:
    """Any pickled object beyond tensors and plain containers."""


@pytest.fixture(scope="module")
def tiny() -> DvdCLIP:
    torch.manual_seed(0)
    return create_clip("dvd-tiny-vit")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_tiny_configs_are_registered_with_open_clip_and_small() -> None:
    assert {"dvd-tiny-vit", "dvd-tiny-vit-64"} <= set(open_clip.list_models())
    for name, size in (("dvd-tiny-vit", 32), ("dvd-tiny-vit-64", 64)):
        cfg = open_clip.get_model_config(name)
        assert cfg["vision_cfg"]["image_size"] == size
        assert cfg["text_cfg"]["context_length"] == 32
        assert 64 <= cfg["vision_cfg"]["width"] <= 128 and 2 <= cfg["vision_cfg"]["layers"] <= 4


def test_encode_image_takes_pixels_and_normalises_with_its_own_buffers(
    tiny: DvdCLIP, images: torch.Tensor
) -> None:
    assert {"mean", "std"} <= {name for name, _ in tiny.named_buffers()}
    assert torch.allclose(tiny.mean.flatten(), torch.tensor(open_clip.OPENAI_DATASET_MEAN))
    expected = F.normalize(tiny.model.encode_image((images - tiny.mean) / tiny.std), dim=-1)
    features = tiny.encode_image(images)
    assert torch.allclose(features, expected, atol=1e-6)
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    # the buffers are what is used: another mean/std gives other features
    model = create_clip("dvd-tiny-vit")
    model.load_state_dict(tiny.state_dict())
    model.set_normalization(IMAGENET_MEAN, IMAGENET_STD)
    assert not torch.allclose(model.encode_image(images), features, atol=1e-4)
    expected = F.normalize(model.model.encode_image((images - model.mean) / model.std), dim=-1)
    assert torch.allclose(model.encode_image(images), expected, atol=1e-6)


def test_gradient_reaches_the_pixels(tiny: DvdCLIP, images: torch.Tensor) -> None:
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(tiny.encode_image(x)[:, 0].sum(), x)
    assert grad.abs().sum() > 0


def test_wrong_image_size_is_a_clear_error(tiny: DvdCLIP) -> None:
    with pytest.raises(ValueError, match=r"64x64 but dvd-tiny-vit takes 32x32"):
        tiny.encode_image(torch.rand(1, 3, 64, 64))


def test_tokenizer_and_text_side(tiny: DvdCLIP) -> None:
    tokens = tiny.tokenize(["a photo of a cat", "a photo of a dog"])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.long
    text = tiny.encode_text(tokens)
    assert text.shape == (2, 64)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert tiny.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)
    out = tiny(torch.rand(2, 3, 32, 32), tokens)
    assert set(out) == {"image_features", "text_features", "logit_scale"}


def test_saved_checkpoint_loads_in_plain_open_clip_with_identical_embeddings(
    tiny: DvdCLIP, images: torch.Tensor, tmp_path
) -> None:
    model = create_clip("dvd-tiny-vit")
    model.load_state_dict(tiny.state_dict())
    model.set_normalization(IMAGENET_MEAN, IMAGENET_STD)
    directory = save_clip(model, tmp_path / "ckpt", metadata={"recipe": "test"})
    assert (directory / WEIGHTS_NAME).is_file()
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert set(config) == {"model_cfg", "preprocess_cfg"}
    assert config["preprocess_cfg"]["mean"] == pytest.approx(IMAGENET_MEAN)
    ours = model.encode_image(images)

    # open_clip's own local-dir loader, with open_clip's own preprocessing config
    plain = open_clip.create_model(f"local-dir:{directory}").eval()
    cfg = open_clip.get_model_preprocess_cfg(plain)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert torch.equal(F.normalize(plain.encode_image((images - mean) / std), dim=-1), ours)

    # a registered recipe name + pretrained=path, the classic open_clip call
    plain = open_clip.create_model("dvd-tiny-vit", pretrained=str(directory / WEIGHTS_NAME)).eval()
    assert torch.equal(F.normalize(plain.encode_image((images - model.mean) / model.std), dim=-1), ours)

    # and back into dvd: same weights, same normalisation, same name
    loaded = load_clip(directory)
    assert loaded.model_name == "dvd-tiny-vit"
    assert torch.equal(loaded.encode_image(images), ours)
    assert torch.allclose(loaded.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    tokens = model.tokenize(["a red circle"])
    assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
    assert torch.equal(create_clip(str(directory)).encode_image(images), ours)


def test_pickled_weights_load_only_as_a_plain_state_dict(
    tiny: DvdCLIP, images: torch.Tensor, tmp_path
) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(tiny.model.state_dict(), plain)
    model = create_clip("dvd-tiny-vit", pretrained=str(plain))
    assert torch.equal(model.encode_image(images), tiny.encode_image(images))

    rogue = tmp_path / "rogue.bin"
    torch.save({"state_dict": tiny.model.state_dict(), "extra": Payload()}, rogue)
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        create_clip("dvd-tiny-vit", pretrained=str(rogue))


def test_config_json_path_builds_a_random_model(tmp_path) -> None:
    cfg = json.loads((MODEL_CONFIG_DIR / "dvd-tiny-vit-64.json").read_text())
    cfg["vision_cfg"]["layers"] = 1
    path = tmp_path / "my-test-vit.json"
    path.write_text(json.dumps(cfg))
    model = create_clip(str(path))
    assert model.model_name == "my-test-vit" and model.image_size == 64
    assert len(model.model.visual.transformer.resblocks) == 1
    assert model.encode_image(torch.rand(1, 3, 64, 64)).shape == (1, 128)


def test_hf_hub_model_offline_is_a_one_line_unreachable_error(monkeypatch, tmp_path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        create_clip("hf-hub:zw123/delta_clip_h14_336")
    message = str(error.value)
    assert "hf-hub:zw123/delta_clip_h14_336" in message and "hub is unreachable" in message
    assert "\n" not in message


def test_bad_names_are_one_line_errors_with_suggestions(tmp_path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'dvd-tiny-vit'"):
        create_clip("dvd-tiny-vitt")
    with pytest.raises(ConfigError, match="neither a file nor a tag"):
        create_clip("dvd-tiny-vit", pretrained="laion2b")
    with pytest.raises(ConfigError, match="unknown precision"):
        create_clip("dvd-tiny-vit", precision="fp31")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_clip(str(tmp_path / "missing.json"))
    (tmp_path / "delta-clip").mkdir()
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory .did you mean 'delta-clip'"):
        create_clip(str(tmp_path / "delta-clipp"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        create_clip(str(tmp_path / "empty"))
