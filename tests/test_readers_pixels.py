"""Image decoding in every reader: 16-bit images keep their brightness, huge images are refused from
their header (skipped and counted, never decoded)."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _shards import write_shard
from dvd.data import transforms
from dvd.data.image_text import ImageRecords
from dvd.data.transforms import decode_image, plain_tensor

RAMP = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)  # true mean 0.5


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_png_decodes_scaled_to_unit_range() -> None:
    assert Image.open(io.BytesIO(png(RAMP))).mode == "I;16"
    pixels = plain_tensor()(decode_image(png(RAMP)))
    assert pixels.shape == (3, 64, 64)
    assert float(pixels.mean()) == pytest.approx(0.5, abs=2e-3)
    assert float(pixels.min()) == 0 and float(pixels.max()) == 1
    assert float((pixels == 1).float().mean()) < 0.01  # not clipped to white


def test_a_16_bit_png_in_a_shard_reads_like_its_8_bit_twin(tmp_path: Path) -> None:
    from dvd.data.image_text import image_text_shards

    eight = (RAMP / 257).round().astype(np.uint8)
    shard = write_shard(tmp_path / "s.tar", [("a", {"png": png(RAMP), "txt": b"16"}),
                                             ("b", {"png": png(eight), "txt": b"8"})])
    (sixteen, _), (twin, _) = list(image_text_shards(str(shard), transform=None))
    assert float((sixteen - twin).abs().max()) <= 1 / 255 + 1e-6


def test_an_image_above_the_pixel_cap_is_refused_before_it_is_decoded(monkeypatch) -> None:
    big = png(np.zeros((3000, 3000), dtype=np.uint8))  # 9 M pixels, a few KB compressed
    monkeypatch.setattr(transforms, "MAX_PIXELS", 4_000_000)
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"3000x3000 = 9000000 pixels is above the limit of 4000000"):
        decode_image(big)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000  # the 9 MB of pixels were never allocated
    assert decode_image(big, max_pixels=9_000_000).size == (3000, 3000)


def test_readers_skip_and_count_images_above_the_cap(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(transforms, "MAX_PIXELS", 100 * 100)
    paths = []
    for name, side in (("small", 50), ("huge", 200), ("fits", 100)):
        paths.append(tmp_path / f"{name}.png")
        paths[-1].write_bytes(png(np.zeros((side, side), dtype=np.uint8)))
    records = [{"key": p.stem, "paths": (str(p),), "fields": {}} for p in paths]
    reader = ImageRecords(records, source="three", transform=None)
    assert [item["image"].shape[-1] for item in reader] == [50, 100]
    assert [key for key, _ in reader.skipped] == ["huge"]
    assert "above the limit" in reader.skipped[0][1]
