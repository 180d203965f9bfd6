"""Image preprocessing: open_clip's resize/crop recipes without the mean/std step.

Normalisation lives inside the model wrapper (dvd.models.clip), so every transform here ends in
``ToTensor``: a float tensor in [0, 1] of shape (3, H, W), the pixel space attacks work in.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from dvd.config import positive_int

ImageTransform = Callable[[Image.Image], torch.Tensor]

# Images above this many pixels are refused before decoding (readers skip and count them): an 8192 x 8192
# image, 64 Mi pixels (~200 MB as 8-bit RGB, several times that while resizing). Set DVD_MAX_PIXELS to change.
MAX_PIXELS = positive_int(os.environ.get("DVD_MAX_PIXELS", 8192 * 8192), "DVD_MAX_PIXELS")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how older Pillows open 16-bit PNGs


def to_rgb(image: Image.Image) -> Image.Image:
    """Grey, palette, CMYK and alpha images become plain RGB (alpha is dropped, as in open_clip)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def check_image_batch(images: torch.Tensor, image_size: int, *, expected: str, taker: str) -> None:
    """Refuse anything but (B, 3, image_size, image_size) images; the error names ``expected`` (the
    shape wanted) and ``taker`` (what takes ``image_size``), and how to resize."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape {expected}, got {tuple(images.shape)}")
    if images.shape[-2:] != (image_size, image_size):
        raise ValueError(
            f"images are {images.shape[-2]}x{images.shape[-1]} but {taker} takes "
            f"{image_size}x{image_size}; resize with image_transform({image_size})"
        )


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


def decode_image(data: bytes | Path, *, max_pixels: int | None = None) -> Image.Image:
    """Fully decode image bytes (or a file) into an 8-bit RGB PIL image.

    ``load()`` is forced here so that a truncated or corrupt file fails now, inside the reader's
    skip-and-count guard, and not later inside a DataLoader worker. An image of more than ``max_pixels``
    (default :data:`MAX_PIXELS`) is refused from its header, before decoding. 16-bit greyscale images are
    scaled from [0, 65535] (Pillow would clip them at 255: almost white); float images are refused.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    source = data if isinstance(data, Path) else io.BytesIO(data)
    with Image.open(source) as image:
        width, height = image.size
        if width * height > limit:
            raise ValueError(
                f"image of {width}x{height} = {width * height} pixels is above the limit of {limit} "
                "(DVD_MAX_PIXELS); skipped"
            )
        image.load()
        if image.mode in SIXTEEN_BIT_MODES:
            levels = np.asarray(image, dtype=np.float64).clip(0, 65535) * (255 / 65535)
            return Image.fromarray(levels.round().astype(np.uint8), mode="L").convert("RGB")
        if image.mode == "F":
            raise ValueError("floating-point image (mode F) has no defined pixel range; convert it to 8 bit")
        return image.convert("RGB")  # a new image: the file handle closes with the context
