"""dvd eval retrieval: recall@k (checked by hand), the caption-set attack, rows, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dvd.cli import main
from dvd.data.transforms import image_transform
from dvd.eval import retrieval
from dvd.eval.results import ROW_KEYS
from dvd.eval.retrieval import (
    RetrievalData,
    evaluate_retrieval,
    image_to_text_hits,
    load_retrieval,
    recall_at_k,
    text_to_image_hits,
)
from dvd.models.clip import DvdCLIP, create_clip


def test_recall_at_k_on_a_hand_checked_similarity_matrix() -> None:
    # 3 images, 4 captions; captions 0 and 1 belong to image 0, caption 2 to image 1, caption 3 to image 2
    text_to_image = torch.tensor([0, 0, 1, 2])
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # image 0: own caption 0 is first                    -> rank 0
            [0.8, 0.2, 0.4, 0.6],  # image 1: own caption 2 behind captions 0 and 3     -> rank 2
            [0.1, 0.7, 0.7, 0.7],  # image 2: own caption 3 tied with captions 1 and 2  -> rank 2
        ]
    )
    assert image_to_text_hits(similarity, text_to_image, 1).tolist() == [True, False, False]
    assert image_to_text_hits(similarity, text_to_image, 3).tolist() == [True, True, True]
    # captions: 0 -> image 0 first; 1 -> image 0 last of 3; 2 -> image 1 last of 3; 3 -> image 2 first
    assert text_to_image_hits(similarity, text_to_image, 1).tolist() == [True, False, False, True]
    assert text_to_image_hits(similarity, text_to_image, 2).tolist() == [True, False, False, True]
    assert text_to_image_hits(similarity, text_to_image, 3).tolist() == [True, True, True, True]
    recalls = recall_at_k(similarity, text_to_image, ks=(1, 2, 3))
    assert recalls == pytest.approx(
        {
            "image_to_text_recall@1": 1 / 3, "text_to_image_recall@1": 2 / 4,
            "image_to_text_recall@2": 1 / 3, "text_to_image_recall@2": 2 / 4,
            "image_to_text_recall@3": 1.0, "text_to_image_recall@3": 1.0,
        }
    )


def test_captions_equal_to_class_names_tie_and_ties_count_against_the_model() -> None:
    # four images of classes cat, dog, cat, bird; each image's caption is its class name
    classes = ["cat", "dog", "cat", "bird"]
    text_to_image = torch.arange(4)
    similarity = torch.tensor([[float(a == b) for b in classes] for a in classes])  # a perfect class matcher
    # the two cats cannot tell their captions apart: each is tied with the other cat's caption
    assert image_to_text_hits(similarity, text_to_image, 1).tolist() == [False, True, False, True]
    assert text_to_image_hits(similarity, text_to_image, 1).tolist() == [False, True, False, True]
    assert recall_at_k(similarity, text_to_image, ks=(1, 2)) == pytest.approx(
        {
            "image_to_text_recall@1": 0.5, "text_to_image_recall@1": 0.5,
            "image_to_text_recall@2": 1.0, "text_to_image_recall@2": 1.0,
        }
    )
    # a collapsed model (all scores equal) retrieves nothing at k < number of candidates
    flat = torch.zeros(4, 4)
    assert recall_at_k(flat, text_to_image, ks=(1, 3)) == pytest.approx(
        {
            "image_to_text_recall@1": 0.0, "text_to_image_recall@1": 0.0,
            "image_to_text_recall@3": 0.0, "text_to_image_recall@3": 0.0,
        }
    )


@pytest.fixture(scope="module")
def model() -> DvdCLIP:
    torch.manual_seed(0)
    return create_clip("dvd-tiny-vit")


def _photos(coco: Path, model: DvdCLIP) -> RetrievalData:
    return load_retrieval(
        str(coco / "annotations.json"),
        transform=image_transform(model.image_size),
        image_root=str(coco / "images"),
    )


def test_clean_recall_is_recall_of_the_model_similarity_matrix(model: DvdCLIP, coco: Path) -> None:
    data = _photos(coco, model)
    rows = evaluate_retrieval(
        model, data, eps_list=[], attack="none", ks=(1, 2), batch_size=2, progress=False
    )
    with torch.no_grad():
        images = torch.stack([data.dataset[i][0] for i in range(5)])
        captions = [c for i in range(5) for c in data.dataset[i][1]]
        similarity = model.encode_image(images) @ model.encode_text(model.tokenize(captions)).t()
    expected = recall_at_k(similarity, torch.arange(5).repeat_interleave(2), ks=(1, 2))
    assert {r.metric: r.clean for r in rows} == pytest.approx(expected)
    assert {r.metric: r.n for r in rows}["image_to_text_recall@1"] == 5
    assert {r.metric: r.n for r in rows}["text_to_image_recall@1"] == 10
    assert all(r.adversarial is None and r.eps == 0 for r in rows)


def test_attack_raises_the_caption_set_loss_inside_the_ball(model: DvdCLIP, coco: Path) -> None:
    data = _photos(coco, model)
    images = torch.stack([data.dataset[i][0] for i in range(3)])
    captions = [c for i in range(5) for c in data.dataset[i][1]]
    with torch.no_grad():
        text = model.encode_text(model.tokenize(captions))
    owner = torch.arange(5).repeat_interleave(2)
    eps = 8 / 255
    run = retrieval._AttackRun(model.eval(), data, text, owner, eps=eps, attack="apgd", steps=10)
    adversarial = run._attack(images, torch.arange(3), seed=0)
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    own = {"own": owner.view(1, -1) == torch.arange(3).view(-1, 1)}
    with torch.no_grad():
        before, after = run._caption_set_loss(images, own), run._caption_set_loss(adversarial, own)
    assert (after >= before - 1e-6).all() and (after > before).any()


def test_interrupted_retrieval_resumes_and_gives_the_same_rows(
    model: DvdCLIP, coco: Path, tmp_path: Path, monkeypatch
) -> None:
    data = _photos(coco, model)
    settings = dict(eps_list=[4 / 255], attack="pgd", steps=2, batch_size=2, ks=(1, 5), progress=False)
    real = retrieval._AttackRun._attack
    calls = []

    def counted(self, images, index, *, seed):
        calls.append(seed)
        if interrupt and len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images, index, seed=seed)

    monkeypatch.setattr(retrieval._AttackRun, "_attack", counted)
    interrupt = False
    reference = evaluate_retrieval(model, data, state_dir=tmp_path / "reference", **settings)
    assert calls == [0, 2, 4]
    calls.clear()
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        evaluate_retrieval(model, data, state_dir=tmp_path / "run", **settings)
    calls.clear()
    interrupt = False
    resumed = evaluate_retrieval(model, data, state_dir=tmp_path / "run", **settings)
    assert calls == [2, 4]  # the first batch's adversarial features came from the saved state
    same = ("metric", "clean", "adversarial", "n", "eps")
    assert [[getattr(r, k) for k in same] for r in resumed] == [
        [getattr(r, k) for k in same] for r in reference
    ]


def test_cli_writes_rows_for_coco_captions_and_shapesworld(
    model: DvdCLIP, coco: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    args = ["eval", "retrieval", "--model", "dvd-tiny-vit", "--dataset", str(coco / "annotations.json")]
    args += [
        "--image-root",
        str(coco / "images"),
        "--dataset-name",
        "photos",
        "--eps",
        "2/255",
        "--steps",
        "2",
    ]
    assert main([*args, "--batch-size", "3", "--out", str(out), "--no-progress"]) == 0
    from dvd.data.shapesworld import generate

    generate(tmp_path / "world", size=8, eval_size=6, instruct_size=2, shard_size=8)
    args = [
        "eval",
        "retrieval",
        "--model",
        "dvd-tiny-vit",
        "--dataset",
        str(tmp_path / "world"),
        "--attack",
        "none",
    ]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())
    assert all(tuple(row) == ROW_KEYS for row in rows)
    photos = [r for r in rows if r["dataset"] == "photos"]
    metrics = {f"{d}_recall@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert {r["metric"] for r in photos} == metrics
    assert all(
        r["task"] == "retrieval" and r["attack"] == "apgd" and r["eps"] == pytest.approx(2 / 255)
        for r in photos
    )
    assert {r["n"] for r in photos} == {5, 10}
    world = [r for r in rows if r["dataset"] == "shapesworld/captions"]
    assert len(world) == 6 and all(r["adversarial"] is None for r in world)
    assert not (tmp_path / "results.json.partial").exists()


def test_unknown_retrieval_inputs_are_one_line_errors(tmp_path: Path, capsys) -> None:
    base = ["eval", "retrieval", "--model", "dvd-tiny-vit", "--out", str(tmp_path / "r.json")]
    assert main([*base, "--dataset", str(tmp_path), "--attack", "apdg"]) == 2
    assert "did you mean 'apgd'" in capsys.readouterr().err
    assert main([*base, "--dataset", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
