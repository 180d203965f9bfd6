"""CLIP for dvd: an open_clip model that takes [0, 1] images and normalises them itself.

Attacks live in pixel space, so mean/std (per model, from its preprocessing config: OpenAI's for open_clip
names, ImageNet's for the released ΔCLIPs; ``dvd train clip normalization=`` picks what a trained model
saves) are buffers of the wrapper, not part of the data pipeline.
Checkpoints are open_clip's own hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``),
so a saved model loads in plain open_clip with ``create_model("local-dir:DIR")``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from dvd.config import ConfigError, suggest
from dvd.data.transforms import check_image_batch
from dvd.io import atomic_write, read_json, versions, write_json
from dvd.models import clip_hub
from dvd.models.clip_weights import load_pickle, load_vision_weights

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
DVD_NAME = "dvd_model.json"
PICKLED_WEIGHTS = (
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.pth",
)
PRECISIONS = ("fp32", "fp16", "bf16", "amp", "amp_bf16", "pure_fp16", "pure_bf16")
HF_HUB_PREFIX = "hf-hub:"


def register_model_configs() -> None:
    """Make dvd's tiny recipes (``src/dvd/model_configs/*.json``) known to open_clip by name."""
    if not all(p.stem in open_clip.list_models() for p in MODEL_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


register_model_configs()  # importing dvd.models makes "dvd-tiny-vit" etc. valid open_clip names


class DvdCLIP(nn.Module):
    """An open_clip CLIP taking [0, 1] images; features come out L2-normalised.

    ``.model`` is the plain open_clip model; ``.mean``/``.std`` are (1, 3, 1, 1) buffers applied
    inside :meth:`encode_image`, so gradients w.r.t. the input are gradients in pixel space.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        model_name: str,
        model_cfg: dict[str, Any],
        preprocess_cfg: dict[str, Any],
        tokenizer: Any,
    ) -> None:
        super().__init__()
        self.model = model
        self.model_name = model_name
        self.model_cfg = copy.deepcopy(model_cfg)
        self.preprocess_cfg = _jsonable(preprocess_cfg)
        self.tokenizer = tokenizer
        self.image_size = _square_size(preprocess_cfg["size"], model_name)
        mean = torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Use another per-channel mean/std (e.g. ImageNet's, as the released ΔCLIPs); saved with it."""
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean and std need 3 values each (std > 0), got {list(mean)} and {list(std)}")
        self.mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.preprocess_cfg.update(mean=[float(m) for m in mean], std=[float(s) for s in std])
        open_clip.set_model_preprocess_cfg(self.model, {**self.preprocess_cfg})

    @property
    def logit_scale(self) -> torch.Tensor:
        """The temperature as a multiplier (``exp`` of open_clip's stored log-scale)."""
        return self.model.logit_scale.exp()

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images of the model's size to the model's normalised input."""
        check_image_batch(images, self.image_size, expected="(B, 3, H, W)", taker=str(self.model_name))
        return (images - self.mean) / self.std

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features (float32) of [0, 1] images; unit length unless ``normalize=False``."""
        weight_dtype = next(self.model.visual.parameters()).dtype
        features = self.model.encode_image(self.normalize(images).to(weight_dtype)).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text features (float32) of token ids from :meth:`tokenize`."""
        features = self.model.encode_text(tokens.to(self.device)).float()
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (LongTensor (N, context), on the model's device) of one text or a batch."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts)).to(self.device)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """open_clip's output dict: normalised image and text features and the logit scale."""
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(tokens),
            "logit_scale": self.logit_scale,
        }


def create_clip(
    model: str,
    *,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    vision_weights: str | Path | None = None,
) -> DvdCLIP:
    """Build a :class:`DvdCLIP` from any of the places a CLIP comes from.

    ``model`` is an open_clip model name (``pretrained``: a tag or a local weights file), an
    ``hf-hub:org/name`` tag (e.g. ``hf-hub:zw123/delta_clip_h14_336``, the paper's ΔCLIP), a path to
    an open_clip model-config JSON (random init unless ``pretrained`` is a weights file) or a saved
    checkpoint directory (:func:`save_clip`). Weights load from safetensors; a pickled file is only
    read with ``torch.load(weights_only=True)`` and only if it is a plain state dict.
    ``vision_weights``: an image-tower-only checkpoint (RobustVLM's TeCoA/FARE ``.pt``) loaded on top.
    """
    clip = _create_clip(model, pretrained=pretrained, device=device, precision=precision)
    if vision_weights is not None:
        load_vision_weights(clip.model.visual, vision_weights)
    return clip


def _create_clip(
    model: str, *, pretrained: str | None, device: str | torch.device, precision: str
) -> DvdCLIP:
    register_model_configs()
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}{suggest(precision, PRECISIONS)}")
    device = _device(device)
    path = Path(model.removeprefix("local-dir:"))
    if model.startswith(HF_HUB_PREFIX):
        if pretrained:
            raise ConfigError(f"{model} carries its own weights; drop --pretrained {pretrained}")
        return _from_hub(model, device=device, precision=precision)
    if path.is_dir():
        if pretrained:
            raise ConfigError(f"{model} is a checkpoint directory with its own weights; drop --pretrained")
        return load_clip(path, device=device, precision=precision)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(
                f"model config {path} does not exist; pass an open_clip model-config JSON"
            )
        if path.name == CONFIG_NAME:
            return load_clip(path.parent, device=device, precision=precision)
        name = _register_config_file(path)
    else:
        name = model.replace("/", "-")
        if name not in open_clip.list_models() and ("/" in model or model.startswith(".")):
            siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
            hint = suggest(path.name, siblings) if siblings else ""
            raise FileNotFoundError(f"{model}: no such checkpoint directory{hint}")
        if name not in open_clip.list_models():
            raise ConfigError(
                f"unknown CLIP model {model!r}{suggest(name, open_clip.list_models())}; give an open_clip "
                "name, hf-hub:org/name, a model-config .json or a checkpoint directory"
            )
    return _from_name(name, pretrained, device=device, precision=precision)


def save_clip(model: DvdCLIP, directory: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` in open_clip's hub layout plus ``dvd_model.json`` (name, versions, ``metadata``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.model.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    preprocess = {k: v for k, v in model.preprocess_cfg.items() if k != "size"}
    write_json(directory / CONFIG_NAME, {"model_cfg": model.model_cfg, "preprocess_cfg": preprocess})
    if hasattr(model.tokenizer, "save_pretrained"):  # HF tokenizers travel with the weights
        model.tokenizer.save_pretrained(str(directory))
    info = {"model_name": model.model_name, "format": "open_clip", "metadata": metadata or {}}
    write_json(directory / DVD_NAME, {**info, "versions": versions()})
    return directory


def load_clip(
    directory: str | Path, *, device: str | torch.device = "cpu", precision: str = "fp32"
) -> DvdCLIP:
    """Load a checkpoint directory in open_clip's hub layout (ours, or one downloaded from the hub)."""
    register_model_configs()
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}; pass a directory from save_clip or an open_clip hub download"
        )
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [directory / n for n in PICKLED_WEIGHTS if (directory / n).is_file()]
        if not pickled:
            raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
        weights = pickled[0]
    device = _device(device)
    info = read_json(directory / DVD_NAME) if (directory / DVD_NAME).is_file() else {}
    name = info.get("model_name") or directory.name
    config = clip_hub.read_config(directory / CONFIG_NAME)
    seen_as = f"{name} {directory.resolve()}"  # a hub-cache snapshot dir is a hash; its path names the repo
    if clip_hub.needs_dvd(config, seen_as, source=str(directory / CONFIG_NAME)):  # ΔCLIP
        return _released(
            config,
            weights,
            name=name,
            seen_as=seen_as,
            directory=directory,
            device=device,
            precision=precision,
        )
    local = f"local-dir:{directory}"
    with _no_random_init_warning():  # the weights are loaded right below, from safetensors only
        model = open_clip.create_model(local, load_weights=False, device=device, precision=precision)
    _load_weights(model, weights)
    return _wrap(model, name, open_clip.get_model_config(local), open_clip.get_tokenizer(local), device)


def _released(
    config: dict[str, Any],
    weights: Path,
    *,
    name: str,
    directory: Path | None,
    device: torch.device,
    precision: str,
    seen_as: str | None = None,
) -> DvdCLIP:
    """A checkpoint stock open_clip builds or tokenizes wrongly (the paper's ΔCLIPs), see clip_hub.

    ``seen_as`` (default ``name``) is what the ``delta_clip`` name rule looks at."""
    with _no_random_init_warning():
        model, cfg, tokenizer = clip_hub.build_released(
            config,
            name=seen_as or name,
            source=str(weights.parent / CONFIG_NAME),
            directory=directory,
            device=device,
            precision=precision,
        )
    _load_weights(model, weights)
    return _wrap(model, name, cfg, tokenizer, device)


def _from_name(name: str, pretrained: str | None, *, device: torch.device, precision: str) -> DvdCLIP:
    """An open_clip model by registered name: random init, a pretrained tag or a local weights file."""
    cfg = open_clip.get_model_config(name)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained is None or Path(pretrained).is_file():
        with _no_random_init_warning() if pretrained else contextlib.nullcontext():
            model = open_clip.create_model(name, device=device, precision=precision)
        if pretrained is not None:
            _load_weights(model, Path(pretrained))
    elif pretrained in tags:
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device=device, precision=precision)
        except (RuntimeError, OSError) as error:
            raise ConfigError(
                f"cannot fetch pretrained weights {pretrained!r} for {name}: the hub or URL is "
                f"unreachable ({_root_cause(error)}); pass a local weights file with --pretrained"
            ) from None
    else:
        hint = suggest(pretrained, tags) if tags else " (this model has no released tags)"
        raise ConfigError(f"--pretrained {pretrained!r} is neither a file nor a tag of {name}{hint}")
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, ValueError) as error:  # HF tokenizers are fetched from the hub on first use
        raise ConfigError(f"cannot load the tokenizer of {name}: {_root_cause(error)}") from None
    return _wrap(model, name, cfg, tokenizer, device)


def _from_hub(tag: str, *, device: torch.device, precision: str) -> DvdCLIP:
    """``hf-hub:org/name`` through open_clip; a missing network is one clear error, not a traceback."""
    try:
        config_path, weights = clip_hub.hub_files(tag.removeprefix(HF_HUB_PREFIX))
        config = clip_hub.read_config(config_path)
        if clip_hub.needs_dvd(config, tag, source=f"{tag} {CONFIG_NAME}"):
            snapshot = config_path.parent
            return _released(
                config, weights, name=tag, directory=snapshot, device=device, precision=precision
            )
        model = open_clip.create_model_from_pretrained(
            tag, device=device, precision=precision, return_transform=False
        )
        cfg = open_clip.get_model_config(tag)
        tokenizer = open_clip.get_tokenizer(tag)
    except ConfigError:
        raise
    except (RuntimeError, OSError, ValueError) as error:
        cause = _root_cause(error)
        if _is_unreachable(error):
            raise ConfigError(
                f"cannot load {tag}: the Hugging Face hub is unreachable and the model is not cached "
                f"({cause}); "
                "run once where huggingface.co is reachable, or pass a local checkpoint directory"
            ) from None
        raise ConfigError(f"cannot load {tag} from the Hugging Face hub: {cause}") from None
    return _wrap(model, tag, cfg, tokenizer, device)


def _wrap(
    model: nn.Module, name: str, cfg: dict[str, Any] | None, tokenizer: Any, device: torch.device
) -> DvdCLIP:
    if cfg is None:
        raise ConfigError(f"open_clip has no model config for {name}")
    preprocess = open_clip.get_model_preprocess_cfg(model)
    clip = DvdCLIP(model, model_name=name, model_cfg=cfg, preprocess_cfg=preprocess, tokenizer=tokenizer)
    return clip.to(device).eval()


def _register_config_file(path: Path) -> str:
    """Register a model-config JSON with open_clip under its file stem; refuse to shadow another recipe."""
    cfg = read_json(path)
    if "model_cfg" in cfg:
        raise ConfigError(f"{path} is an open_clip hub config; pass its directory (with the weights) instead")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ConfigError(f"{path} is not an open_clip model config: missing {', '.join(missing)}")
    name = path.stem
    if name in open_clip.list_models() and open_clip.get_model_config(name) != cfg:
        raise ConfigError(f"{path} differs from the registered open_clip model {name!r}; rename the file")
    open_clip.add_model_config(path)
    return name


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights; a pickle only if ``weights_only=True`` yields a plain state dict."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix != ".safetensors":
        state = load_pickle(path, refusal="it is not a plain state dict")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"refusing {path}: not a state dict of tensors; convert it to .safetensors")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"weights in {path} do not fit the model: {first}") from None


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "initialized randomly" warning when dvd loads the weights itself."""

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "initialized randomly" not in message and "no CLIP weights found" not in message

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was requested but is not available; use --device cpu")
    return device


def _square_size(size: Any, name: str) -> int:
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    if sizes[0] != sizes[1]:
        raise ConfigError(f"{name} takes non-square {sizes} images; dvd supports square inputs only")
    return int(sizes[0])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _root_cause(error: BaseException) -> str:
    """The innermost cause's first line: the part of a wrapped hub error a user can act on."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _is_unreachable(error: BaseException) -> bool:
    markers = (
        "offline",
        "connection",
        "resolve",
        "unreachable",
        "timed out",
        "local cache",
        "proxy",
        "network",
    )
    seen: BaseException | None = error
    while seen is not None:
        name = type(seen).__name__.lower()
        if "offline" in name or "connect" in name or "localentrynotfound" in name or "timeout" in name:
            return True
        if any(m in str(seen).lower() for m in markers):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
