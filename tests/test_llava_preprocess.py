"""LLaVA-1.5's ``pad`` preprocessing in [0, 1], against transformers' LLaVA processor (``do_pad``)."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from dvd.config import ConfigError
from dvd.models.llava_preprocess import expand_to_square, llava_transform, mean_colour, model_transform

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_fill_colour_is_llavas_int_of_mean_times_255():
    assert mean_colour(MEAN) == (122, 116, 104)


@pytest.mark.parametrize("size", [(60, 30), (30, 60), (41, 41)])
def test_expand_to_square_centres_the_image_on_the_mean_colour(size):
    image = photo(*size)
    square = expand_to_square(image, (1, 2, 3))
    side = max(size)
    assert square.size == (side, side)
    left, top = (side - size[0]) // 2, (side - size[1]) // 2
    assert np.array_equal(np.asarray(square)[top : top + size[1], left : left + size[0]], np.asarray(image))
    if size[0] != size[1]:
        assert tuple(np.asarray(square)[0, 0]) == (1, 2, 3) == tuple(np.asarray(square)[-1, -1])


@pytest.mark.parametrize("size", [(90, 50), (50, 90), (64, 64)])
def test_pad_transform_matches_transformers_llava_processor_with_do_pad(size):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    processor = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(MEAN),
        image_std=list(STD),
    )
    image = photo(*size)
    oracle = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])
    oracle = oracle * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    ours = llava_transform(32, MEAN, "pad")(image)
    assert ours.shape == (3, 32, 32) and 0 <= float(ours.min()) and float(ours.max()) <= 1
    assert float((ours - oracle).abs().max()) < 1e-4  # the same PIL bicubic resize: float rounding only


def test_model_transform_prefers_the_models_own_preprocessing():
    class Plain:
        image_size = 32

    class Llava(Plain):
        image_transform = staticmethod(llava_transform(32, MEAN, "pad"))

    wide = photo(64, 32)
    assert model_transform(Llava())(wide).shape == model_transform(Plain())(wide).shape == (3, 32, 32)
    assert not torch.equal(model_transform(Llava())(wide), model_transform(Plain())(wide))


def test_anyres_is_refused():
    with pytest.raises(ConfigError, match="anyres"):
        llava_transform(32, MEAN, "anyres")
