"""LLaVA-1.5's image preprocessing, ending in [0, 1] pixels at the vision tower's input resolution.

LLaVA-1.5 (``image_aspect_ratio = "pad"``) pastes the image centred on a square filled with the image
processor's mean colour (each channel ``int(mean * 255)``), then the CLIP processor resizes the shortest
side (bicubic) and centre-crops to the tower's size. Normalisation stays inside the model, so
the attack perturbs exactly the image the tower sees, as RobustVLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image
from torchvision import transforms as T

from dvd.config import ConfigError
from dvd.data.transforms import ImageTransform, image_transform, to_rgb

ASPECT_RATIOS = ("pad", "square", "")


def mean_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The fill colour of :func:`expand_to_square`: LLaVA's ``tuple(int(x * 255) for x in image_mean)``."""
    if len(mean) != 3:
        raise ConfigError(f"expected a 3-channel mean, got {list(mean)}")
    r, g, b = (int(float(m) * 255) for m in mean)
    return r, g, b


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """``image`` centred on a square canvas of its longer side, the margins filled with ``fill``."""
    image = to_rgb(image)
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class PadToSquare:
    """Picklable transform step: :func:`expand_to_square` with a fixed fill colour."""

    def __init__(self, fill: tuple[int, int, int]) -> None:
        self.fill = fill

    def __call__(self, image: Image.Image) -> Image.Image:
        return expand_to_square(image, self.fill)

    def __repr__(self) -> str:
        return f"PadToSquare(fill={self.fill})"


def llava_transform(image_size: int, mean: Sequence[float], aspect_ratio: str = "pad") -> ImageTransform:
    """The transform LLaVA applies before its CLIP tower, minus normalisation; ``aspect_ratio`` is the
    checkpoint's ``image_aspect_ratio`` (``pad``; anything else is CLIP's plain resize + centre crop)."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ConfigError(
            f"image_aspect_ratio {aspect_ratio!r} is not supported (LLaVA-1.5 uses 'pad'; "
            "LLaVA-NeXT's 'anyres' tiles the image and is not reproduced)"
        )
    plain = image_transform(image_size)
    if aspect_ratio != "pad":
        return plain
    return T.Compose([PadToSquare(mean_colour(mean)), plain])


def model_transform(model: Any) -> ImageTransform:
    """The preprocessing a VLM expects: its own ``image_transform`` if it has one (LLaVA's ``pad``),
    else open_clip's resize + centre crop at ``model.image_size``."""
    own = getattr(model, "image_transform", None)
    return own if own is not None else image_transform(model.image_size)
