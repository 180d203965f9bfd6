"""Image preprocessing: open_clip's resize/crop recipes without the mean/std step.

Normalisation lives inside the model wrapper (DESIGN.md), so every transform here ends in
``ToTensor``: a float tensor in [0, 1] of shape (3, H, W), the pixel space attacks work in.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

from dvd.config import positive_int

ImageTransform = Callable[[Image.Image], torch.Tensor]


def to_rgb(image: Image.Image) -> Image.Image:
    """Grey, palette, CMYK and alpha images become plain RGB (alpha is dropped, as in open_clip)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def image_transform(image_size: int, *, train: bool = False) -> ImageTransform:
    """open_clip's preprocessing minus normalisation.

    eval: resize the shortest side to ``image_size`` (bicubic), centre-crop, ToTensor.
    train: RandomResizedCrop(``image_size``, scale=(0.9, 1.0), bicubic), ToTensor.
    """
    size = positive_int(image_size, "image_size")
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        steps = [T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=bicubic)]
    else:
        steps = [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
    return T.Compose([to_rgb, *steps, T.ToTensor()])


def plain_tensor() -> ImageTransform:
    """No resizing: just RGB + ToTensor (used when a reader is given ``transform=None``)."""
    return T.Compose([to_rgb, T.ToTensor()])


def decode_image(data: bytes | Path) -> Image.Image:
    """Fully decode image bytes (or a file) into an RGB PIL image.

    ``load()`` is forced here so that a truncated or corrupt file fails now, inside the reader's
    skip-and-count guard, and not later inside a DataLoader worker.
    """
    source = data if isinstance(data, Path) else io.BytesIO(data)
    with Image.open(source) as image:
        image.load()
        return image.convert("RGB")  # a new image: the file handle closes with the context
