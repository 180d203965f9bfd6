"""What a CLIP's image embeddings know about each ShapesWorld attribute, against what the same vision
tower can learn with labels.

Two measurements on the world's pre-training pairs (``KEY.json`` holds each image's attributes):

- ``probe``: a linear probe (logistic regression) on the frozen, normalised image embeddings of each
  checkpoint given with ``--model`` (train on the first ``--train`` images of shard 0, test on shard 1);
- ``supervised``: the same open_clip vision tower trained from scratch with cross-entropy on one
  attribute's labels (``--supervised-steps`` steps of batch 64, AdamW, one-cycle lr), test accuracy.

If the probe is at the majority-class rate where the supervised tower learns the attribute, the vision
tower could represent it and contrastive training did not make it: the attribute is not worth the
contrastive loss's while at this budget (feature suppression), not beyond the model.

    python benchmarks/shapesworld_probe.py --world runs/demo/world \\
        --model runs/demo/models/clean-clip/final --model runs/demo/models/delta-clip/final \\
        --supervised shape --supervised texture --supervised-steps 300

Prints one line per measurement and, last, one JSON object with every number.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

ATTRIBUTES = ("color", "shape", "count", "size", "texture")


def read_shard(path: Path, limit: int) -> tuple[torch.Tensor, list[dict]]:
    """The first ``limit`` (image, attributes) pairs of one pre-training shard; images in [0, 1]."""
    from dvd.data.image_text import ShardStream

    stream = ShardStream(str(path), transform=None, target=lambda sample: json.loads(sample["json"]))
    images, attributes = zip(*itertools.islice(stream, limit), strict=True)
    return torch.stack(images), list(attributes)


def labels(rows: list[dict], attribute: str) -> np.ndarray:
    return np.array([str(r[attribute]) for r in rows])


def probe(model_dir: str, train: tuple, test: tuple) -> dict[str, float]:
    """Linear-probe test accuracy per attribute on the frozen image embeddings of one checkpoint."""
    from sklearn.linear_model import LogisticRegression

    from dvd.models.clip import load_clip

    clip = load_clip(model_dir).eval()
    with torch.no_grad():
        features = [
            torch.cat([clip.encode_image(x[i : i + 500]) for i in range(0, len(x), 500)]).numpy()
            for x in (train[0], test[0])
        ]
    result = {}
    for attribute in ATTRIBUTES:
        classifier = LogisticRegression(max_iter=2000).fit(features[0], labels(train[1], attribute))
        result[attribute] = float(classifier.score(features[1], labels(test[1], attribute)))
    return result


def supervised(model: str, attribute: str, steps: int, train: tuple, test: tuple, seed: int) -> float:
    """Test accuracy of ``model``'s vision tower trained from scratch on ``attribute``'s labels."""
    from dvd.models.clip import create_clip

    torch.manual_seed(seed)
    clip = create_clip(model)
    classes = sorted(set(labels(train[1], attribute)))
    y_train = torch.tensor([classes.index(c) for c in labels(train[1], attribute)])
    y_test = torch.tensor([classes.index(c) if c in classes else -1 for c in labels(test[1], attribute)])
    visual = clip.model.visual
    head = torch.nn.Linear(visual.output_dim, len(classes))
    net = torch.nn.Sequential(visual, head)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(y_train), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(net(clip.normalize(train[0][index])), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        chunks = [test[0][i : i + 500] for i in range(0, len(y_test), 500)]
        predicted = torch.cat([net(clip.normalize(x)).argmax(1) for x in chunks])
    return float((predicted == y_test).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="a ShapesWorld root (dvd data shapesworld --out)")
    parser.add_argument("--model", action="append", default=[], help="checkpoint folder to probe (repeat)")
    parser.add_argument("--supervised", action="append", default=[], choices=ATTRIBUTES, help="attribute")
    parser.add_argument("--supervised-model", default="dvd-tiny-vit", help="open_clip name or config JSON")
    parser.add_argument("--supervised-steps", type=int, default=300)
    parser.add_argument("--train", type=int, default=3000, help="images from shard 0 to train on")
    parser.add_argument("--test", type=int, default=1000, help="images from shard 1 to test on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shards = sorted((Path(args.world) / "pretrain").glob("shard-*.tar"))
    if len(shards) < 2:
        raise SystemExit(f"{args.world}/pretrain needs two shards (train on one, test on the other)")
    train, test = read_shard(shards[0], args.train), read_shard(shards[1], args.test)
    majority = {}
    for attribute in ATTRIBUTES:
        values = labels(test[1], attribute)
        majority[attribute] = float(max(np.mean(values == c) for c in set(values)))
    print("majority class " + " ".join(f"{a} {100 * v:.0f}%" for a, v in majority.items()))
    report: dict = {"majority": majority, "probe": {}, "supervised": {}}
    for model_dir in args.model:
        accuracy = probe(model_dir, train, test)
        report["probe"][model_dir] = accuracy
        print(f"probe {model_dir}: " + " ".join(f"{a} {100 * v:.0f}%" for a, v in accuracy.items()))
    for attribute in args.supervised:
        tick = time.perf_counter()
        accuracy = supervised(args.supervised_model, attribute, args.supervised_steps, train, test, args.seed)
        report["supervised"][attribute] = accuracy
        print(f"supervised {args.supervised_model} on {attribute}, {args.supervised_steps} steps: "
              f"{100 * accuracy:.0f}% ({time.perf_counter() - tick:.0f} s)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
