"""Hard-negative batches (`batch_group_by`): grouped batches share the attribute, the rest are mixed,
the same segment gives the same batches, and a source without KEY.json is a clear error."""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest
import torch

from dvd.config import ConfigError, load_config
from dvd.models.clip import create_clip
from dvd.train.clip import train_clip
from dvd.train.clip_config import ClipTrainConfig, check_config
from dvd.train.clip_data import build_dataset, make_loader_factory, shapesworld_shards
from dvd.train.clip_groups import GroupedBatches
from dvd.train.distributed import DistEnv


class Items(torch.utils.data.IterableDataset):
    """(image, (caption, group)) items with the group as the caption: ``n`` items cycling over ``groups``."""

    def __init__(self, n: int, groups: int) -> None:
        super().__init__()
        self.n, self.groups, self.urls = n, groups, ["memory"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for i in range(self.n):
            yield torch.zeros(1), (f"g{i % self.groups}", (i % self.groups,))


def blocks(stream: GroupedBatches, size: int) -> list[list[str]]:
    texts = [text for _, text in stream]
    return [texts[i : i + size] for i in range(0, len(texts) - len(texts) % size, size)]


def test_every_item_comes_out_once_and_prob_one_makes_every_full_batch_one_group():
    stream = GroupedBatches(Items(100, 3), batch_size=8, prob=1.0)
    texts = [text for _, text in stream]
    assert sorted(texts) == sorted(f"g{i % 3}" for i in range(100))
    full = blocks(stream, 8)[: 3 * (100 // 3 // 8)]  # the groups' full runs come before the leftovers
    assert full and all(len(set(b)) == 1 for b in full)


def test_prob_zero_keeps_the_arrival_order_and_a_half_mixes_grouped_and_random_batches():
    unchanged = GroupedBatches(Items(50, 5), batch_size=4, prob=0.0)
    assert [text for _, text in unchanged] == [f"g{i % 5}" for i in range(50)]
    half = blocks(GroupedBatches(Items(4000, 8), batch_size=16, prob=0.5, seed=1), 16)
    grouped = sum(len(set(b)) == 1 for b in half) / len(half)
    assert 0.35 < grouped < 0.65, grouped


def test_the_same_seed_and_epoch_give_the_same_batches_and_another_epoch_others():
    def order(epoch: int) -> list[str]:
        stream = GroupedBatches(Items(300, 4), batch_size=8, prob=0.5, seed=3)
        stream.set_epoch(epoch)
        return [t for _, t in stream]

    assert order(0) == order(0)
    assert order(0) != order(1)


class Scenes(torch.utils.data.IterableDataset):
    """(image, (caption, (color, shape))) items over every colour x shape pair, ``n`` of each, shuffled."""

    def __init__(self, n: int, colors: int = 4, shapes: int = 4) -> None:
        super().__init__()
        rng = random.Random(0)
        self.items = [(c, s) for c in range(colors) for s in range(shapes) for _ in range(n)]
        rng.shuffle(self.items)
        self.urls = ["memory"]

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for c, s in self.items:
            yield torch.zeros(1), (f"{c}/{s}", (c, s))


def test_small_groups_fill_a_batch_and_never_straddle_its_boundary():
    stream = GroupedBatches(Items(400, 5), batch_size=8, prob=1.0, group_size=2)
    texts = [text for _, text in stream]
    runs = [texts[i : i + 2] for i in range(0, 400 - 40, 2)]  # before the leftovers
    assert all(len(set(r)) == 1 for r in runs)
    assert any(len(set(b)) > 1 for b in blocks(stream, 8))  # a batch holds several groups
    with pytest.raises(ValueError, match="batch_group_size must divide"):
        GroupedBatches(Items(1, 1), batch_size=8, prob=1.0, group_size=3)
    mixed = [t for _, t in GroupedBatches(Items(4000, 8), batch_size=16, prob=0.5, seed=1, group_size=4)]
    assert sorted(mixed) == sorted(f"g{i % 8}" for i in range(4000))


def test_a_free_attribute_makes_groups_of_minimal_pairs_that_differ_in_it_alone():
    stream = GroupedBatches(Scenes(40), batch_size=8, prob=1.0, group_size=4, free=[0, 1])
    texts = [text for _, text in stream]
    groups = [[t.split("/") for t in texts[i : i + 4]] for i in range(0, len(texts) - 64, 4)]
    same_color = [g for g in groups if len({c for c, _ in g}) == 1]
    same_shape = [g for g in groups if len({s for _, s in g}) == 1]
    assert all(g in same_color or g in same_shape for g in groups)  # each agrees on all but one attribute
    assert any(len({s for _, s in g}) > 1 for g in same_color)  # and varies the free one
    assert any(len({c for c, _ in g}) > 1 for g in same_shape)
    assert 0.3 < len(same_color) / len(groups) < 0.7  # the left-out attribute is drawn per sample


def test_out_of_range_prob_is_refused():
    with pytest.raises(ValueError, match="batch_group_prob"):
        GroupedBatches(Items(1, 1), batch_size=2, prob=1.5)


def test_shapesworld_batches_grouped_by_color_share_the_color_of_their_captions(shapesworld: Path):
    colors = {}
    for shard in shapesworld_shards(shapesworld):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    colors.setdefault(meta["caption"], set()).add(meta["color"])
    cfg = load_config(ClipTrainConfig, None, [f"data={shapesworld}", "recipe=clean", "batch_size=4",
                                              "shuffle_buffer=0", "batch_group_by=[color]",
                                              "batch_group_prob=1.0"])
    dataset, collate, _ = build_dataset(cfg, create_clip("dvd-tiny-vit"))
    loader = make_loader_factory(dataset, cfg=cfg, env=DistEnv(), collate=lambda items: items)(0)
    batches = list(loader)
    # a caption without a colour word can stand for several colours: a batch is one colour if one fits all
    grouped = [b for b in batches if set.intersection(*(colors[text] for _, text in b))]
    assert len(grouped) >= len(batches) - 8  # at most the leftovers (< 4 per colour) come out mixed


def test_a_grouped_clean_run_trains_and_a_csv_source_or_a_bad_prob_is_a_one_line_error(shapesworld, tmp_path):
    tiny = ["model=dvd-tiny-vit", "batch_size=8", "progress=false", "warmup_steps=1", "shuffle_buffer=16"]
    cfg = load_config(ClipTrainConfig, None, [f"data={shapesworld}", f"output_dir={tmp_path / 'g'}", *tiny,
                                              "recipe=clean", "steps=2", "checkpoint_every=2",
                                              "batch_group_by=[color]"])
    assert Path(train_clip(cfg)["final"]).is_dir()
    with pytest.raises(ConfigError, match="batch_group_prob"):
        check_config(load_config(ClipTrainConfig, None, [f"data={shapesworld}", "batch_group_prob=2"]))
    with pytest.raises(ConfigError, match="batch_group_size must divide batch_size 8"):
        check_config(load_config(ClipTrainConfig, None, [f"data={shapesworld}", *tiny, "batch_group_size=3"]))
    with pytest.raises(ConfigError, match=r"batch_group_free \['shape'\] not in batch_group_by"):
        check_config(load_config(ClipTrainConfig, None, [f"data={shapesworld}", "batch_group_by=[color]",
                                                         "batch_group_free=[shape]"]))
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath\ttitle\n")
    cfg = load_config(ClipTrainConfig, None, [f"data={csv}", "recipe=clean", "batch_group_by=[color]"])
    with pytest.raises(ConfigError, match="KEY.json"):
        build_dataset(cfg, create_clip("dvd-tiny-vit"))
