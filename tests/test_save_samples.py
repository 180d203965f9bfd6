"""--save-samples: every VLM evaluation keeps its per-sample outputs and worst-case images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _eval_helpers import run
from dvd.eval.samples import SampleWriter, load_image, save_image


def test_an_8bit_image_is_a_png_that_reads_back_exactly_and_any_other_a_float_npy(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    exact = torch.randint(0, 256, (3, 5, 7), generator=g).float() / 255
    off = (exact + 0.3 / 255).clamp(0, 1)
    png, npy = save_image(exact, tmp_path / "a"), save_image(off, tmp_path / "b")
    assert (png.suffix, npy.suffix) == (".png", ".npy")
    assert torch.equal(load_image(png), exact)
    assert torch.equal(load_image(npy), off)


def test_a_resumed_writer_skips_the_records_it_already_has(tmp_path: Path):
    SampleWriter(tmp_path, "set").write([{"id": 0, "clean": "a"}, {"id": 1, "clean": "b"}])
    SampleWriter(tmp_path, "set").write([{"id": 1, "clean": "b"}, {"id": 2, "clean": "c"}])
    lines = (tmp_path / "set.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [0, 1, 2]


@pytest.mark.parametrize("command", ["caption", "vqa"])
def test_vlm_evaluations_save_outputs_and_worst_case_images(
    shapesworld, tiny_vlm, tmp_path, command
):
    samples = tmp_path / "samples"
    rows = run(["eval", command], tmp_path / "r.json", "--model", str(tiny_vlm), "--data", str(shapesworld),
               "--eps", "8/255", "--save-samples", str(samples))
    (jsonl,) = samples.glob("*-eps8of255.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(rows[0].n))
    for record in records:
        assert record["references"] and record["clean"] == record["outputs"][0]
        assert record["adversarial"] in record["outputs"]
        # a stage is named exactly when an attacked output scored below the clean one (so it differs)
        assert (record["broken_by"] is None) == (record["adversarial"] == record["outputs"][0])
        assert record["broken_by"] is None or record["broken_by"].startswith(("ref", "best", "target"))
        image = load_image(jsonl.with_suffix("") / record["image"])
        assert image.dim() == 3 and 0 <= float(image.min()) and float(image.max()) <= 1


def test_retrieval_saves_each_images_captions_and_top_caption_clean_and_attacked(coco, tmp_path):
    from dvd.cli import main

    samples = tmp_path / "samples"
    args = ["eval", "retrieval", "--model", "dvd-tiny-vit", "--dataset", str(coco / "annotations.json"),
            "--image-root", str(coco / "images"), "--eps", "16/255", "--steps", "2", "--batch-size", "3",
            "--out", str(tmp_path / "r.json"), "--save-samples", str(samples), "--no-progress"]
    assert main(args) == 0
    (jsonl,) = samples.glob("retrieval-*.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows = {r["metric"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert len(records) == rows["image_to_text_recall@1"]["n"]
    for which in ("clean", "adversarial"):
        hits = sum(r[f"{which}_correct"] for r in records) / len(records)
        assert hits == pytest.approx(rows["image_to_text_recall@1"][which])
    for record in records:
        assert len(record["references"]) == 2
        assert record["clean"] in record["references"] or not record["clean_correct"]
        broken = record["clean_correct"] and not record["adversarial_correct"]
        assert (record["broken_by"] is not None) == broken
        assert (jsonl.with_suffix("") / record["image"]).exists()
