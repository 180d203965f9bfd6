"""``dvd eval zeroshot --protocol``: the published suites, CLIP_benchmark's sample selection, the
paper table and CSV, resume per dataset; on ShapesWorld stand-ins under the real dataset names."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

import dvd.eval.zeroshot_protocols as protocols
from dvd.cli import main
from dvd.data.wds_selection import SelectedSamples, Selection, selected_keys
from dvd.data.zeroshot import load_zeroshot
from dvd.eval.zeroshot import ZeroShotClassifier
from dvd.models.clip import create_clip


def png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value % 256, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(split: Path, shards: int, per_shard: int, classes: int = 3) -> list[str]:
    split.mkdir(parents=True)
    urls = []
    for shard in range(shards):
        url = split / f"{shard}.tar"
        with wds.TarWriter(str(url)) as sink:
            for index in range(per_shard):
                key = f"s{shard:02d}_{index:04d}"
                image = png(shard * per_shard + index)
                sink.write({"__key__": key, "png": image, "cls": str(index % classes)})
        urls.append(str(url))
    (split / "nshards.txt").write_text(str(shards))
    return urls


# ------------------------------------------------------------------------------- the selection


def clip_benchmark_order(urls: list[str], selection: Selection) -> list[tuple[str, str]]:
    """What RobustVLM's CLIP_benchmark does: WebDataset, seeded shuffle, batched, DataLoader workers."""
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda src: src, empty_check=False)
        .shuffle(10000, initial=10000, rng=random.Random(selection.seed))
        .map(lambda sample: (sample["__url__"], sample["__key__"]))
        .batched(selection.batch_size, collation_fn=list)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=selection.workers)
    return [tuple(pair) for batch in loader for pair in batch][: selection.samples]


@pytest.mark.parametrize(
    ("shards", "per_shard", "workers", "batch_size", "samples"),
    [(5, 7, 2, 3, 20), (3, 9, 4, 4, 25), (1, 30, 0, 5, 12), (6, 5, 4, 50, 30)],
)
def test_selection_is_the_order_clip_benchmark_yields(
    tmp_path, shards, per_shard, workers, batch_size, samples
) -> None:
    urls = write_shards(tmp_path / "test", shards, per_shard)
    selection = Selection(samples, seed=0, batch_size=batch_size, workers=workers)
    expected = clip_benchmark_order(urls, selection)
    assert selected_keys(urls, selection) == expected
    assert len(expected) == min(samples, shards * per_shard)


def test_selected_samples_read_the_chosen_images_and_labels(tmp_path) -> None:
    urls = write_shards(tmp_path / "test", 3, 4)
    selection = Selection(6, seed=0, batch_size=2, workers=2)
    data = SelectedSamples(urls, selection, transform=None, target=lambda s: int(s["cls"]))
    assert len(data) == 6
    for (url, key), (image, label) in zip(data.keys, data, strict=True):
        shard, index = int(key[1:3]), int(key[4:])
        assert url.endswith(f"{shard}.tar") and label == index % 3
        assert image.shape == (3, 8, 8) and image[0, 0, 0].item() == pytest.approx((shard * 4 + index) / 255)


# ------------------------------------------------------------------------------- the presets


def test_presets_hold_the_published_dataset_lists_and_settings() -> None:
    robustvlm, paper = protocols.PROTOCOLS["robustvlm"], protocols.PROTOCOLS["dvd"]
    assert robustvlm.datasets == (
        "vtab/cifar10", "stl10", "vtab/cifar100", "cars", "vtab/caltech101", "vtab/pets", "vtab/flowers",
        "vtab/dtd", "vtab/eurosat", "fgvc_aircraft", "vtab/pcam", "imagenet-r", "imagenet_sketch",
    )
    assert robustvlm.separate == (("imagenet1k", 5000),)
    assert robustvlm.eps == (2 / 255, 4 / 255) and paper.eps == (4 / 255,)
    assert len(paper.datasets) == len(set(paper.datasets)) == 38
    assert {"imagenet1k", "objectnet", "vtab/svhn", "vtab/dmlab", "renderedsst2"} <= set(paper.datasets)
    for preset in (robustvlm, paper):
        assert (preset.samples, preset.steps, preset.logit_scale, preset.attack, preset.workers) == (
            1000, 100, 100.0, "aa", 4,
        )
    assert (robustvlm.batch_size, paper.batch_size) == (50, 8)


def test_dataset_directories_follow_clip_benchmark_naming(tmp_path) -> None:
    (tmp_path / "wds_vtab-cifar10").mkdir()
    (tmp_path / "fgvc_aircraft").mkdir()
    assert protocols.dataset_dir("vtab/cifar10", str(tmp_path)) == tmp_path / "wds_vtab-cifar10"
    assert protocols.dataset_dir("fgvc_aircraft", str(tmp_path)) == tmp_path / "fgvc_aircraft"
    template = str(tmp_path / "wds_{dataset_cleaned}")
    assert protocols.dataset_dir("vtab/cifar10", template) == tmp_path / "wds_vtab-cifar10"
    assert protocols.dataset_dir("vtab/dtd", template) is None


def test_protocol_view_scales_logits_by_100_and_resizes_native_inputs_bicubic() -> None:
    torch.manual_seed(0)
    model = create_clip("dvd-tiny-vit")
    view = protocols.ProtocolCLIP(model, logit_scale=100.0, input_size=16)
    assert view.image_size == 16
    assert ZeroShotClassifier(view, ["red", "blue"], ["a {c} shape."]).scale == 100.0
    small = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        large = F.interpolate(small, size=(32, 32), mode="bicubic", align_corners=False)
        expected = model.encode_image(large)
        assert torch.allclose(view.encode_image(small), expected)


# ------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    """ShapesWorld tasks laid out as CLIP_benchmark's wds_* dirs under three RobustVLM names."""
    from dvd.data.shapesworld import generate

    base = tmp_path_factory.mktemp("protocol")
    generate(base / "world", size=8, eval_size=12, instruct_size=2, shard_size=8)
    root = base / "datasets"
    for task, name in (("color", "vtab-cifar10"), ("size", "vtab-pcam"), ("shape", "stl10")):
        shutil.copytree(base / "world" / "zeroshot" / task, root / f"wds_{name}")
    return root


@pytest.fixture
def quick(monkeypatch) -> None:
    """The robustvlm preset with 3 attack steps and 10 samples: the same code path, seconds on a CPU."""
    preset = dataclasses.replace(protocols.PROTOCOLS["robustvlm"], steps=3, samples=10, batch_size=4)
    monkeypatch.setitem(protocols.PROTOCOLS, "robustvlm", preset)


def run(standins: Path, out: Path, *extra: str) -> int:
    args = ["eval", "zeroshot", "--protocol", "robustvlm", "--model", "dvd-tiny-vit", "--device", "cpu"]
    return main([*args, "--dataset-root", str(standins), "--out", str(out), "--no-progress", *extra])


def test_missing_datasets_are_all_named_before_any_model_is_loaded(standins, tmp_path, capsys) -> None:
    args = ["eval", "zeroshot", "--protocol", "robustvlm", "--model", "no-such-model"]
    assert main([*args, "--dataset-root", str(standins), "--out", str(tmp_path / "r.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert "11 of 14 robustvlm datasets are missing" in error and "no-such-model" not in error
    for name in ("vtab/cifar100", "cars", "imagenet_sketch", "imagenet1k"):
        assert name in error
    assert "vtab/cifar10," not in error and "--skip-missing" in error and "\n" not in error


def test_protocol_prints_the_paper_table_writes_csv_and_resumes_per_dataset(
    standins, tmp_path, capsys, quick, monkeypatch
) -> None:
    out = tmp_path / "results.json"
    assert run(standins, out, "--skip-missing") == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert sorted({r["dataset"] for r in rows}) == ["stl10", "vtab/cifar10", "vtab/pcam"]
    assert len(rows) == 6 and {(r["attack"], r["steps"], r["n"]) for r in rows} == {("aa", 3, 10)}
    assert sorted({round(r["eps"] * 255, 6) for r in rows}) == [2, 4]
    table = list(csv.reader(out.with_suffix(".csv").open()))
    assert table[0] == ["dataset", "n", "clean", "2/255", "4/255"]
    assert [line[0] for line in table[1:]] == ["vtab/cifar10", "stl10", "vtab/pcam", "average (3)"]
    by_name = {r["dataset"]: r for r in rows if round(r["eps"] * 255) == 4}
    assert table[1][2] == f"{100 * by_name['vtab/cifar10']['clean']:.1f}"
    assert table[1][4] == f"{100 * by_name['vtab/cifar10']['adversarial']:.1f}"
    mean_clean = sum(by_name[n]["clean"] for n in ("vtab/cifar10", "stl10", "vtab/pcam")) / 3
    assert table[4][2] == f"{100 * mean_clean:.1f}"
    assert "average (3)" in printed and "2/255" in printed

    def no_work(*args, **kwargs):
        raise AssertionError("a finished dataset was evaluated again")

    monkeypatch.setattr(protocols, "evaluate_zeroshot", no_work)
    assert run(standins, out, "--skip-missing") == 0
    assert list(csv.reader(out.with_suffix(".csv").open())) == table
    assert json.loads(out.read_text()) == rows


def test_limit_still_works_with_a_protocol(standins, tmp_path, quick) -> None:
    out = tmp_path / "results.json"
    assert run(standins, out, "--skip-missing", "--limit", "3") == 0
    assert {r["n"] for r in json.loads(out.read_text())} == {3}


def test_save_samples_reaches_every_dataset_and_budget_of_a_protocol(standins, tmp_path, quick) -> None:
    samples = tmp_path / "samples"
    flags = ("--skip-missing", "--limit", "2", "--save-samples", str(samples))
    assert run(standins, tmp_path / "r.json", *flags) == 0
    sets = sorted(samples.glob("zeroshot-*.jsonl"))
    assert len(sets) == 6  # 3 datasets x 2 budgets
    assert all(len(path.read_text().splitlines()) == 2 for path in sets)


def test_protocol_and_dataset_flags_conflict_in_one_line(standins, tmp_path, capsys) -> None:
    assert run(standins, tmp_path / "r.json", "--dataset", str(standins)) == 2
    assert "fixes the datasets, budgets and attack; drop --dataset" in capsys.readouterr().err
    args = ["eval", "zeroshot", "--protocol", "robustvlmm", "--model", "dvd-tiny-vit", "--dataset-root", "x"]
    assert main(args) == 2
    assert "did you mean 'robustvlm'" in capsys.readouterr().err


# ------------------------------------------------------------------------------- ImageNet fallbacks


def test_imagenet_image_folder_gets_open_clip_names_and_openai_templates(tmp_path) -> None:
    import open_clip

    for index in range(1000):
        folder = tmp_path / "imagenet" / "val" / f"n{index:08d}"
        folder.mkdir(parents=True)
        if index < 2:
            (folder / "a.png").write_bytes(png(index))
    data = load_zeroshot(tmp_path / "imagenet", transform=None, split="val")
    assert data.classnames == list(open_clip.IMAGENET_CLASSNAMES)
    assert len(data.templates) == 80 and data.templates[0] == "a bad photo of a {c}."


def test_images_get_the_models_open_clip_preprocessing_without_normalize() -> None:
    import open_clip

    torch.manual_seed(0)
    model = create_clip("dvd-tiny-vit")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8))
    ours = protocols.published_transform(model)(image)
    _, _, reference = open_clip.create_model_and_transforms("dvd-tiny-vit")
    mean, std = torch.tensor(model.preprocess_cfg["mean"]), torch.tensor(model.preprocess_cfg["std"])
    assert ours.shape == (3, 32, 32) and 0 <= ours.min() and ours.max() <= 1
    assert torch.allclose(ours, reference(image) * std.view(3, 1, 1) + mean.view(3, 1, 1), atol=1e-5)


def test_flags_that_would_change_the_published_attack_are_refused(standins, tmp_path, capsys) -> None:
    assert run(standins, tmp_path / "r.json", "--eps", "8/255", "--steps", "10") == 2
    assert "drop --eps, --steps" in capsys.readouterr().err
    # the protocol runs without the masking checks, so an escalation budget would be silently unused
    assert run(standins, tmp_path / "r.json", "--escalation-queries", "1000") == 2
    assert "drop --escalation-queries" in capsys.readouterr().err
    assert run(standins, tmp_path / "r.json", "--check-queries", "50") == 2
    assert "drop --check-queries" in capsys.readouterr().err


def test_multilabel_datasets_are_left_out_up_front(tmp_path, capsys) -> None:
    for name in ("wds_voc2007_multilabel", "wds_voc2007"):
        (tmp_path / name).mkdir()
    (tmp_path / "wds_voc2007_multilabel" / "dataset_type.txt").write_text("multilabel\n")
    suite = protocols.plan(protocols.PROTOCOLS["dvd"], str(tmp_path), skip_missing=True)
    assert [name for name, _, _ in suite] == ["voc2007"]
    assert "skipping voc2007_multilabel: a CLIP_benchmark multilabel dataset" in capsys.readouterr().err
