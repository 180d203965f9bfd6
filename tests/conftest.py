"""Suite-wide settings and shared fixtures.

One intra-op thread: the test models are tiny; on a 2-core machine extra torch threads only add
contention (several times slower), and subprocesses (torchrun, CLI runs) inherit the setting.
``shapesworld`` is one small world generated once per session for every test that only reads it;
``tiny_vlm`` a tiny random VLM speaking its vocabulary; ``photos`` and ``coco`` scikit-image's sample
photos as a zero-shot ImageFolder and as COCO-style captions. Plain helpers live in ``_*.py`` modules.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import skimage  # noqa: E402
import torch  # noqa: E402

from _photos import COCO_PHOTOS, PHOTOS, TEMPLATES  # noqa: E402
from dvd.data.shapesworld import generate  # noqa: E402

torch.set_num_threads(1)

# 96 pre-training pairs in 4 shards, 20 held-out images per task, 32 px: seconds to write
SHAPESWORLD = {"seed": 0, "size": 96, "image_size": 32, "eval_size": 20, "shard_size": 24}


@pytest.fixture(scope="session")
def shapesworld(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ShapesWorld root shared by the session; tests must not write into it."""
    root = tmp_path_factory.mktemp("shapesworld") / "sw"
    generate(root, **SHAPESWORLD)
    return root


@pytest.fixture(scope="session")
def tiny_vlm(shapesworld: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random dvd VLM (vicuna_v1_short) whose word tokenizer covers ``shapesworld``'s texts."""
    # deferred: transformers and open_clip take seconds to import, and most runs never build a VLM
    from _eval_helpers import world_tokenizer
    from dvd.models.vlm import create_vlm
    from dvd.models.vlm_io import save_vlm
    from tiny_models import TINY_LLAMA, tiny_tower

    torch.manual_seed(0)
    tokenizer = world_tokenizer(shapesworld)
    model = create_vlm(tiny_tower(), TINY_LLAMA, tokenizer=tokenizer, template="vicuna_v1_short")
    return save_vlm(model, tmp_path_factory.mktemp("tiny_vlm") / "tiny-dvd")


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of real photos (512 px and larger, some greyscale) with classnames and templates."""
    root = tmp_path_factory.mktemp("zs") / "photos"
    source = Path(skimage.data.__file__).parent
    for name, files in PHOTOS.items():
        (root / "test" / name).mkdir(parents=True)
        for file in files:
            shutil.copy(source / file, root / "test" / name / file)
    (root / "classnames.txt").write_text("\n".join(sorted(PHOTOS)) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


@pytest.fixture(scope="session")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """COCO-style captions of scikit-image's photos: two captions per photo, built from its class name."""
    root = tmp_path_factory.mktemp("ret")
    source = Path(skimage.data.__file__).parent
    images, annotations = [], []
    for name, files in COCO_PHOTOS.items():
        for file in files:
            (root / "images" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(source / file, root / "images" / name / file)
            images.append({"id": len(images), "file_name": f"{name}/{file}"})
            for caption in (f"a photo of a {name}", name):
                annotations.append({"id": len(annotations), "image_id": images[-1]["id"], "caption": caption})
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root
