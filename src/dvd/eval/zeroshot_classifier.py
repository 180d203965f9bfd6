"""The zero-shot classifier of a CLIP: class names x templates -> text weights, and the attacks run on it.

Per class, the mean of its template embeddings, re-normalised, computed once per dataset.
:class:`ZeroShotClassifier` maps [0, 1] images to logits, so any attack of :mod:`dvd.attacks` runs on it in
pixel space.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dvd.attacks import ATTACKS as ENSEMBLE_ATTACKS
from dvd.attacks import PRESETS, parse_attacks
from dvd.config import ConfigError, suggest

ATTACKS: dict[str, tuple[str, ...]] = {
    "apgd-ce": ("apgd-ce",),
    "aa": ("apgd-ce", "apgd-t"),  # AutoAttack's white-box pair, as in the paper's protocol
    "pgd": (),  # plain PGD on the cross-entropy, run here (not an ensemble member)
    "none": (),
}
PLACEHOLDER = "{c}"


def resolve_attacks(attack: str) -> tuple[str, ...]:
    """The ensemble behind ``--attack``: a name above, ``aa-standard`` or a comma list of dvd's attacks."""
    if attack in ATTACKS:
        return ATTACKS[attack]
    known = sorted({*ATTACKS, *PRESETS, *ENSEMBLE_ATTACKS})
    for name in attack.split(",") if attack not in PRESETS else ():
        if name.strip() not in ENSEMBLE_ATTACKS:
            raise ConfigError(f"unknown attack {name.strip()!r}{suggest(name.strip(), known)}")
    try:
        return parse_attacks(attack)
    except ValueError as error:
        raise ConfigError(str(error)) from None


class ZeroShotData(Protocol):
    """What :func:`dvd.data.zeroshot.load_zeroshot` returns."""

    classnames: list[str]
    templates: list[str]
    name: str
    dataset: Iterable[tuple[torch.Tensor, int]]


@torch.no_grad()
def build_text_classifier(
    model: nn.Module, classnames: Sequence[str], templates: Sequence[str], *, batch_size: int = 256
) -> torch.Tensor:
    """(D, C) zero-shot weights: per class, the mean of its normalised template embeddings, re-normalised."""
    if not classnames or not templates:
        raise ConfigError("a zero-shot classifier needs at least one class name and one template")
    for template in templates:
        if PLACEHOLDER not in template:
            raise ConfigError(f"template {template!r} has no {PLACEHOLDER} placeholder for the class name")
    texts = [t.replace(PLACEHOLDER, c) for c in classnames for t in templates]
    chunks = [
        model.encode_text(model.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)
    ]
    features = F.normalize(torch.cat(chunks).float(), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1).t().contiguous()


class ZeroShotClassifier(nn.Module):
    """[0, 1] images -> class logits: ``logit_scale * image_features @ text_classifier``.

    The text classifier is computed once, here, and kept as a buffer; the scale is the model's own
    (exp'ed, frozen at construction), so the logits are the ones CLIP was trained to produce.
    """

    def __init__(
        self,
        model: nn.Module,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        text_batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.model = model
        self.classnames = list(classnames)
        self.register_buffer(
            "weights", build_text_classifier(model, classnames, templates, batch_size=text_batch_size)
        )
        self.scale = float(model.logit_scale.detach())

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * self.model.encode_image(images) @ self.weights


def classifier_fingerprint(classifier: ZeroShotClassifier) -> str:
    """Identifies model + classifier for resuming: text weights and the logits of one fixed probe image."""
    size = classifier.image_size
    ramp = torch.linspace(0, 1, size * size, device=classifier.weights.device).view(1, 1, size, size)
    probe = torch.cat([ramp, ramp.flip(-1), ramp.flip(-2)], dim=1)
    with torch.no_grad():
        logits = classifier(probe).float().cpu()
    digest = hashlib.sha1(classifier.weights.float().cpu().numpy().round(4).tobytes())
    digest.update(logits.numpy().round(3).tobytes())
    return digest.hexdigest()[:16]
