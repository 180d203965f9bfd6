"""Fuzzing the readers: whatever bytes arrive, the only failures are the documented one-line errors.

JSON readers raise ValueError / FileNotFoundError naming the file (or image root); shard readers
never raise for bad members at all (they skip and count) except "no readable samples" when
nothing is usable.
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dvd.data.captions import CocoCaptions
from dvd.data.image_text import image_text_shards
from dvd.data.instruct import LlavaInstruct
from dvd.data.pope import Pope
from dvd.data.transforms import image_transform
from dvd.data.vqa import VQAv2
from dvd.data.zeroshot import load_zeroshot

T8 = image_transform(8)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def png(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 12), color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image root with two images; the fuzzed files are written next to it."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "a.png").write_bytes(png())
    (root / "COCO_val2014_000000000001.jpg").write_bytes(png())
    return root


VALID: dict[str, Any] = {
    "coco": {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"}],
    },
    "karpathy": {
        "images": [
            {"filepath": "", "filename": "a.png", "cocoid": 1, "split": "test", "sentences": [{"raw": "x"}]}
        ]
    },
    "vqa-questions": {
        "data_subtype": "val2014",
        "questions": [{"image_id": 1, "question": "Q?", "question_id": 7}],
    },
    "vqa-annotations": {
        "annotations": [
            {"question_id": 7, "image_id": 1, "answer_type": "other", "answers": [{"answer": "red"}] * 10}
        ]
    },
    "pope": [{"question_id": 1, "image": "a.png", "text": "Is there a square in the image?", "label": "yes"}],
    "llava": [
        {
            "id": "1",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "A square."},
            ],
        }
    ],
}


def read(kind: str, path: Path, root: Path) -> Any:
    """Build the reader of ``kind`` on ``path`` and go over every item."""
    if kind == "coco":
        ds: Any = CocoCaptions(path, root, transform=T8)
    elif kind == "karpathy":
        ds = CocoCaptions(None, root, transform=T8, karpathy_json=path, split="test")
    elif kind == "vqa-questions":
        ds = VQAv2(path, None, root, transform=T8)
    elif kind == "vqa-annotations":
        questions = root / "questions.json"
        questions.write_text(json.dumps(VALID["vqa-questions"]))
        ds = VQAv2(questions, path, root, transform=T8)
    elif kind == "pope":
        ds = Pope(path, root, transform=T8)
    else:
        ds = LlavaInstruct(path, root, transform=T8)
    items = list(ds)
    assert all(item is not None for item in items)
    return ds


def serialise(kind: str, value: Any) -> bytes:
    if kind == "pope" and isinstance(value, list):
        return "\n".join(json.dumps(row) for row in value).encode()
    return json.dumps(value).encode()


def assert_clear(error: BaseException, root: Path) -> None:
    message = str(error)
    assert isinstance(error, ValueError | FileNotFoundError), f"{type(error).__name__}: {message}"
    assert "\n" not in message and str(root) in message, message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
KINDS = st.sampled_from(sorted(VALID))


def attempt(kind: str, data: bytes, root: Path) -> None:
    path = root / f"input-{kind}.json"
    path.write_bytes(data)
    try:
        read(kind, path, root)
    except Exception as error:  # noqa: BLE001 - the assertion below is the point of the test
        assert_clear(error, root)


@FUZZ
@given(kind=KINDS, data=st.binary(max_size=200) | st.text(max_size=80).map(str.encode))
def test_random_bytes_as_a_json_file_raise_only_clear_errors(world, kind, data):
    attempt(kind, data, world)


@FUZZ
@given(kind=KINDS, value=json_values)
def test_random_json_documents_raise_only_clear_errors(world, kind, value):
    attempt(kind, serialise(kind, value), world)


def paths_in(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON document, as a key/index path."""
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += paths_in(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += paths_in(inner, (*prefix, index))
    return found


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=KINDS, data=st.data())
def test_valid_files_with_one_field_replaced_raise_only_clear_errors(world, kind, data):
    document = copy.deepcopy(VALID[kind])
    where = data.draw(st.sampled_from(paths_in(document)[1:]))
    replacement = data.draw(json_values | st.just(None) | st.sampled_from(["../x.png", "", "a.png", "\x00"]))
    target = document
    for step in where[:-1]:
        target = target[step]
    if data.draw(st.booleans()) and isinstance(target, dict):
        del target[where[-1]]
    else:
        target[where[-1]] = replacement
    attempt(kind, serialise(kind, document), world)


def test_the_unmutated_fuzz_seeds_are_valid(world):
    for kind in VALID:
        path = world / f"seed-{kind}.json"
        path.write_bytes(serialise(kind, VALID[kind]))
        assert len(read(kind, path, world)) == 1


member_names = st.text(alphabet="ab0._-/", min_size=1, max_size=10)
member_data = st.binary(max_size=120) | st.just(png()) | st.just(png()[:40]) | st.just(b"a caption")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@FUZZ
@given(
    members=st.lists(st.tuples(member_names, member_data), max_size=8),
    good=st.integers(0, 2),
    garbage=st.none() | st.binary(max_size=600),
)
def test_garbage_tar_members_are_skipped_and_counted_never_raised(world, members, good, garbage):
    shard = world / "fuzz.tar"
    pairs = [(f"good{i}.{ext}", data) for i in range(good) for ext, data in (("png", png()), ("txt", b"ok"))]
    members = members + pairs
    write_tar(shard, members)
    if garbage is not None:  # a shard that is not a tar at all, or a tar with trailing junk
        shard.write_bytes(garbage if len(garbage) % 2 else shard.read_bytes()[: len(garbage)] + garbage)
    ds = image_text_shards(str(shard), transform=T8)
    try:
        items = list(ds)
    except ValueError as error:
        assert str(error).startswith(f"no readable samples in {shard}")
        items = []
    assert all(image.shape == (3, 8, 8) and 0 <= image.min() and image.max() <= 1 for image, _ in items)
    assert all(isinstance(caption, str) for _, caption in items)
    assert len(items) + len(ds.skipped) == ds.seen
    if garbage is None and good:
        assert sum(caption == "ok" for _, caption in items) >= 1


@FUZZ
@given(
    labels=st.lists(
        st.binary(max_size=6) | st.sampled_from([b"0", b"1", b"2", b" 1\n", b"-1", b"9"]), max_size=6
    )
)
def test_zero_shot_cls_fields_of_any_bytes_give_labels_in_range_or_a_count(world, labels):
    root = world / "task"
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("a\nb\nc\n")
    members = [(f"{i}.png", png()) for i in range(len(labels))] + [
        (f"{i}.cls", b) for i, b in enumerate(labels)
    ]
    write_tar(root / "test" / "0.tar", sorted(members, key=lambda m: m[0].split(".")[0]))
    task = load_zeroshot(root, transform=T8)
    try:
        pairs = list(task.dataset)
    except ValueError as error:
        assert str(error).startswith("no readable samples")
        pairs = []
    assert all(label in (0, 1, 2) for _, label in pairs)
    assert len(pairs) + len(task.dataset.skipped) == len(labels)
