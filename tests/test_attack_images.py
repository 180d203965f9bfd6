"""dvd attack: adversarial images of a folder against a CLIP (zero-shot labels) or a VLM (answer / target)."""

from __future__ import annotations

import json
from pathlib import Path

from dvd.cli import main
from dvd.eval.samples import load_image


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "attack.jsonl").read_text().splitlines()]


def test_clip_attack_writes_adversarial_images_and_what_changed(photos: Path, tmp_path: Path):
    out = tmp_path / "adv"
    folder = photos / "test"
    labels = "cat,person,space,texture"
    args = ["attack", "--images", str(folder), "--clip", "dvd-tiny-vit", "--labels", labels,
            "--eps", "32/255", "--steps", "3", "--attack", "apgd-ce", "--out", str(out)]
    assert main(args) == 0
    records = records_of(out)
    assert len(records) == 10
    for record in records:
        assert record["label"] == record["id"].split("/")[0]  # the folder names the label
        assert record["changed"] == (record["clean"] != record["adversarial"])
        # only a correctly classified image is attacked, and it is broken when its prediction moved
        broken = record["clean"] == record["label"] != record["adversarial"]
        assert (record["broken_by"] is not None) == broken
        image = load_image(out / "attack" / record["image"])
        assert image.shape == (3, 32, 32)
    assert any(r["broken_by"] == "apgd-ce" for r in records)


def test_vlm_attack_towards_a_target_keeps_the_images_inside_the_budget(
    shapesworld: Path, tiny_vlm: Path, tmp_path: Path
):
    out = tmp_path / "adv"
    images = next(p for p in shapesworld.rglob("*.png")).parent
    args = ["attack", "--images", str(images), "--vlm", str(tiny_vlm), "--target", "a red circle.",
            "--eps", "8/255", "--steps", "2", "--limit", "2", "--max-new-tokens", "6", "--out", str(out)]
    assert main(args) == 0
    records = records_of(out)
    assert len(records) == 2
    for record in records:
        assert record["targeted"] and record["attacked_answer"] == "a red circle."
        assert record["changed"] == (record["clean"].strip() != record["adversarial"].strip())
        assert (out / "attack" / record["image"]).exists()


def test_bad_attack_arguments_are_one_line_errors(photos: Path, tmp_path: Path, capsys):
    base = ["attack", "--images", str(photos / "test"), "--out", str(tmp_path / "o")]
    assert main([*base, "--clip", "dvd-tiny-vit"]) == 2
    assert "--clip needs --labels" in capsys.readouterr().err
    assert main([*base, "--clip", "dvd-tiny-vit", "--labels", "a,b", "--eps", "0"]) == 2
    assert "--eps must be > 0" in capsys.readouterr().err
    assert main(["attack", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--clip",
                 "dvd-tiny-vit", "--labels", "a,b"]) == 2
    assert "neither a folder" in capsys.readouterr().err


def test_images_can_come_from_a_webdataset_shard(photos: Path, tmp_path: Path):
    import tarfile

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, file in enumerate(sorted((photos / "test" / "texture").iterdir())):
            tar.add(file, arcname=f"{i:04d}.png")
    out = tmp_path / "adv"
    args = ["attack", "--images", str(shard), "--clip", "dvd-tiny-vit", "--labels", "texture,space",
            "--eps", "4/255", "--steps", "2", "--attack", "apgd-ce", "--out", str(out)]
    assert main(args) == 0
    assert [r["id"] for r in records_of(out)] == ["0000", "0001", "0002"]
