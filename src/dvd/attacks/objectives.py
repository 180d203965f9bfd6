"""Attack objectives: per-sample losses to maximise, with success flags from the same forward.

An objective is called on images in [0, 1] and returns an :class:`ObjectiveOutput`: the loss (B,)
that the attack maximises and, when the objective knows it, a bool (B,) ``success`` ("this image is
already adversarial") computed from the same forward pass, so early stopping never costs a second
forward. Everything per sample (labels, targets, reference embeddings, text features, a batch of
token ids) lives in the objective and is sliced by :meth:`Objective.subset`, which lets an attack
drop the samples it has already broken.

The models inside an objective must be in eval mode (the caller's job: attacks do not change modes);
their parameters are frozen for the duration of an attack (see :mod:`dvd.attacks.gradients`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Classifier = Callable[[Tensor], Tensor]
"""Any callable from images in [0, 1] (B, ...) to logits (B, C)."""


@dataclass(frozen=True)
class ObjectiveOutput:
    """A per-sample ``loss`` (B,) to maximise and, if known, per-sample ``success`` flags (B,) bool."""

    loss: Tensor
    success: Tensor | None = None


def modules_of(*callables: object, depth: int = 4) -> tuple[nn.Module, ...]:
    """The modules behind callables: a module itself, a bound method's owner, a partial's function
    and arguments, a wrapper's ``__wrapped__``, or modules a function captures or names as globals
    (``lambda x: model(x) @ text.T``). Used to freeze parameters during an attack."""
    found: dict[int, nn.Module] = {}

    def visit(fn: object, level: int) -> None:
        if fn is None or level > depth:
            return
        if isinstance(fn, nn.Module):
            found.setdefault(id(fn), fn)
            return
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module):
            found.setdefault(id(owner), owner)
            return
        if isinstance(fn, functools.partial):
            for inner in (fn.func, *fn.args, *fn.keywords.values()):
                visit(inner, level + 1)
            return
        visit(getattr(fn, "__wrapped__", None), level + 1)
        captured = []
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                captured.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
        code, names = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
        if code is not None:
            captured.extend(names[name] for name in code.co_names if name in names)
        for content in captured:
            if callable(content) and not isinstance(content, type):
                visit(content, level + 1)

    for fn in callables:
        visit(fn, 0)
    return tuple(found.values())


def _slice(value: Any, index: Tensor) -> Any:
    """``value`` restricted to the samples ``index`` (tensors, sequences along dim 0; dicts recursively)."""
    if isinstance(value, Tensor):
        return value[index.to(value.device)]
    if isinstance(value, Mapping):
        return {k: _slice(v, index) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(value[i] for i in index.tolist())
    raise TypeError(f"per-sample value of type {type(value).__name__} cannot be sliced; use tensors or lists")


class Objective:
    """Base class: ``objective(x) -> ObjectiveOutput`` and ``objective.subset(index) -> Objective``."""

    def __call__(self, x: Tensor) -> ObjectiveOutput:
        raise NotImplementedError

    def subset(self, index: Tensor) -> Objective:
        """The same objective restricted to the samples ``index`` (a LongTensor into the current batch)."""
        raise NotImplementedError

    def modules(self) -> tuple[nn.Module, ...]:
        """Modules whose parameters must stay untouched while this objective is attacked."""
        return ()


# --------------------------------------------------------------------------------------------------
# Classification losses over logits


def _cross_entropy(logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _top(logits: Tensor, k: int) -> Tensor:
    """The k largest logits per row, descending (fewer if there are fewer classes)."""
    return logits.topk(min(k, logits.shape[1]), dim=1).values


def _dlr(logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    # Croce & Hein 2020, eq. 6: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3). With fewer than three
    # classes the scale cannot be normalised away and the plain margin is used.
    z_y = logits.gather(1, labels[:, None])[:, 0]
    z_other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    top = _top(logits, 3)
    scale = top[:, 0] - top[:, 2] if top.shape[1] >= 3 else torch.ones_like(z_y)
    return -(z_y - z_other) / (scale + 1e-12)


def _targeted_dlr(logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    # Croce & Hein 2020, eq. 7: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2); degrades like _dlr.
    assert targets is not None
    z_y = logits.gather(1, labels[:, None])[:, 0]
    z_t = logits.gather(1, targets[:, None])[:, 0]
    top = _top(logits, 4)
    if top.shape[1] >= 4:
        scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3])
    elif top.shape[1] == 3:
        scale = top[:, 0] - top[:, 2]
    else:
        scale = torch.ones_like(z_y)
    return -(z_y - z_t) / (scale + 1e-12)


def _margin(logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    # max_{i != y} z_i - z_y: positive exactly when the sample is misclassified (Square Attack's loss).
    z_y = logits.gather(1, labels[:, None])[:, 0]
    return logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1) - z_y


def _targeted_margin(logits: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    # z_t - z_y: its zero level set is the boundary between the label and the target (FAB-T's hyperplane).
    assert targets is not None
    return logits.gather(1, targets[:, None])[:, 0] - logits.gather(1, labels[:, None])[:, 0]


LogitLoss = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class LogitObjective(Objective):
    """A loss over a classifier's logits; success = the prediction differs from the label."""

    def __init__(
        self, classifier: Classifier, labels: Tensor, loss: LogitLoss, *, targets: Tensor | None = None
    ):
        if labels.dim() != 1:
            raise ValueError(f"labels must be a 1-d LongTensor (B,), got shape {tuple(labels.shape)}")
        if targets is not None and targets.shape != labels.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match labels {tuple(labels.shape)}")
        self.classifier = classifier
        self.labels = labels.long()
        self.targets = None if targets is None else targets.long()
        self.loss = loss

    def __call__(self, x: Tensor) -> ObjectiveOutput:
        logits = self.classifier(x).float()
        labels = self.labels.to(logits.device)
        targets = None if self.targets is None else self.targets.to(logits.device)
        loss = self.loss(logits, labels, targets)
        return ObjectiveOutput(loss, logits.detach().argmax(dim=1) != labels)

    def subset(self, index: Tensor) -> LogitObjective:
        targets = None if self.targets is None else _slice(self.targets, index)
        return LogitObjective(self.classifier, _slice(self.labels, index), self.loss, targets=targets)

    def modules(self) -> tuple[nn.Module, ...]:
        return modules_of(self.classifier)


def cross_entropy(classifier: Classifier, labels: Tensor) -> LogitObjective:
    """Untargeted cross-entropy of the true labels (APGD-CE's loss)."""
    return LogitObjective(classifier, labels, _cross_entropy)


def dlr(classifier: Classifier, labels: Tensor) -> LogitObjective:
    """Untargeted Difference-of-Logits-Ratio loss (APGD-DLR), invariant to logit shift and scale."""
    return LogitObjective(classifier, labels, _dlr)


def targeted_dlr(classifier: Classifier, labels: Tensor, targets: Tensor) -> LogitObjective:
    """Targeted DLR towards ``targets`` (APGD-T); success is still any misclassification."""
    return LogitObjective(classifier, labels, _targeted_dlr, targets=targets)


def targeted_margin(classifier: Classifier, labels: Tensor, targets: Tensor) -> LogitObjective:
    """Logit difference ``z_t - z_y`` towards ``targets`` (FAB-T's decision boundary at 0)."""
    return LogitObjective(classifier, labels, _targeted_margin, targets=targets)


def margin(classifier: Classifier, labels: Tensor) -> LogitObjective:
    """Logit margin ``max_{i != y} z_i - z_y`` (the Square Attack's score)."""
    return LogitObjective(classifier, labels, _margin)


# --------------------------------------------------------------------------------------------------
# CLIP and embedding objectives


class ClipContrastive(Objective):
    """Each image's share of CLIP's symmetric InfoNCE loss against fixed, paired text features.

    With logits ``s * f(x_i) . t_j`` over the batch, sample i contributes the image->text
    cross-entropy of row i plus the text->image cross-entropy of column i, halved; the batch mean of
    these is CLIP's loss. The text side (``text_features`` (B, D), normalised, and the exp'ed
    ``logit_scale``) is computed once outside and held fixed. The text->image term couples the images
    of a batch, so :meth:`subset` defines a smaller batch. Success: image i no longer retrieves text i.
    """

    def __init__(self, encode_image: Callable[[Tensor], Tensor], text_features: Tensor, logit_scale: Any):
        if text_features.dim() != 2:
            raise ValueError(f"text_features must be (B, D), got shape {tuple(text_features.shape)}")
        self.encode_image = encode_image
        self.text_features = text_features.detach()
        self.logit_scale = torch.as_tensor(logit_scale).detach().float()

    def __call__(self, x: Tensor) -> ObjectiveOutput:
        if x.shape[0] != self.text_features.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {self.text_features.shape[0]} paired text features")
        image_features = self.encode_image(x).float()
        text = self.text_features.to(image_features.device).float()
        logits = self.logit_scale.to(image_features.device) * image_features @ text.t()
        own = torch.arange(x.shape[0], device=logits.device)
        image_to_text = F.cross_entropy(logits, own, reduction="none")
        text_to_image = F.cross_entropy(logits.t(), own, reduction="none")
        return ObjectiveOutput(0.5 * (image_to_text + text_to_image), logits.detach().argmax(dim=1) != own)

    def subset(self, index: Tensor) -> ClipContrastive:
        return ClipContrastive(self.encode_image, _slice(self.text_features, index), self.logit_scale)

    def modules(self) -> tuple[nn.Module, ...]:
        return modules_of(self.encode_image)


def clip_contrastive(
    encode_image: Callable[[Tensor], Tensor], text_features: Tensor, logit_scale: Any
) -> ClipContrastive:
    """CLIP's per-image symmetric contrastive loss against fixed text features (Delta-CLIP, TeCoA)."""
    return ClipContrastive(encode_image, text_features, logit_scale)


class EmbeddingDistance(Objective):
    """Squared L2 distance of ``encode(x)`` to fixed reference embeddings (FARE's inner loss)."""

    def __init__(self, encode: Callable[[Tensor], Tensor], reference: Tensor):
        self.encode = encode
        self.reference = reference.detach()

    def __call__(self, x: Tensor) -> ObjectiveOutput:
        features = self.encode(x).float()
        diff = features - self.reference.to(features.device).float()
        return ObjectiveOutput(diff.flatten(1).pow(2).sum(dim=1))

    def subset(self, index: Tensor) -> EmbeddingDistance:
        return EmbeddingDistance(self.encode, _slice(self.reference, index))

    def modules(self) -> tuple[nn.Module, ...]:
        return modules_of(self.encode)


def embedding_distance(encode: Callable[[Tensor], Tensor], reference: Tensor) -> EmbeddingDistance:
    """FARE: maximise ``||encode(x) - reference||_2^2`` per sample."""
    return EmbeddingDistance(encode, reference)


# --------------------------------------------------------------------------------------------------
# Generic callables (language-model losses and anything else)


class CallableObjective(Objective):
    """Wraps ``fn(x)`` or, with a per-sample ``batch``, ``fn(x, batch)``.

    ``fn`` returns a loss (B,), a ``(loss, success)`` pair or an :class:`ObjectiveOutput`. Every value
    in ``batch`` (a dict of tensors / lists, or one tensor / list) is per sample along dim 0 and is
    sliced by :meth:`subset`; shared state belongs in ``fn``'s closure. ``sign=-1`` minimises.
    """

    def __init__(self, fn: Callable[..., Any], *, batch: Any = None, sign: float = 1.0):
        self.fn = fn
        self.batch = batch
        self.sign = sign

    def __call__(self, x: Tensor) -> ObjectiveOutput:
        result = self.fn(x) if self.batch is None else self.fn(x, self.batch)
        if isinstance(result, ObjectiveOutput):
            loss, success = result.loss, result.success
        elif isinstance(result, tuple):
            loss, success = result
        else:
            loss, success = result, None
        if not isinstance(loss, Tensor) or loss.shape != (x.shape[0],):
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"objective must return a per-sample loss of shape ({x.shape[0]},), got {shape}")
        success = None if success is None else success.detach().bool()
        return ObjectiveOutput(self.sign * loss.float(), success)

    def subset(self, index: Tensor) -> CallableObjective:
        batch = None if self.batch is None else _slice(self.batch, index)
        if self.batch is None:
            # Without per-sample state the callable is batch-size agnostic.
            return self
        return CallableObjective(self.fn, batch=batch, sign=self.sign)

    def modules(self) -> tuple[nn.Module, ...]:
        return modules_of(self.fn)


def from_callable(fn: Callable[..., Any], *, batch: Any = None) -> CallableObjective:
    """Any callable returning a per-sample loss to maximise (optionally ``(loss, success)``)."""
    return CallableObjective(fn, batch=batch)


def lm_nll(nll: Callable[..., Tensor], *, batch: Any = None, targeted: bool = False) -> CallableObjective:
    """A language model's per-sample NLL of answer tokens: ``nll(images, batch) -> (B,)``
    (``nll(images)`` when ``batch`` is None).

    Untargeted (``targeted=False``) maximises the NLL of the true answer; targeted minimises the NLL
    of a target string (e.g. a target caption). ``batch`` holds the per-sample token ids and masks.
    """
    return CallableObjective(nll, batch=batch, sign=-1.0 if targeted else 1.0)


# --------------------------------------------------------------------------------------------------
# Expectation over transformation (randomised models)


class Expectation(Objective):
    """``objective`` averaged over ``draws`` forwards: EOT (Athalye et al., 2018) for a randomised model.

    The loss is the mean over draws, so its input gradient is the average gradient; a sample counts
    as broken only when every draw says so, which keeps early stopping from trusting a lucky draw.
    """

    def __init__(self, objective: Objective, draws: int):
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"eot draws must be an integer >= 1, got {draws!r}")
        self.objective = objective
        self.draws = draws

    def __call__(self, x: Tensor) -> ObjectiveOutput:
        outs = [self.objective(x) for _ in range(self.draws)]
        loss = torch.stack([o.loss for o in outs]).mean(dim=0)
        if any(o.success is None for o in outs):
            return ObjectiveOutput(loss)
        return ObjectiveOutput(loss, torch.stack([o.success for o in outs]).all(dim=0))

    def subset(self, index: Tensor) -> Expectation:
        return Expectation(self.objective.subset(index), self.draws)

    def modules(self) -> tuple[nn.Module, ...]:
        return self.objective.modules()


def expectation(objective: Objective, draws: int) -> Objective:
    """``objective`` itself for one draw, else its EOT average over ``draws`` forwards."""
    averaged = Expectation(objective, draws)  # validates draws
    return objective if draws == 1 else averaged


# --------------------------------------------------------------------------------------------------
# Low-precision forward


_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LowPrecision:
    """``fn`` run under ``torch.autocast`` in bf16/fp16, its output cast back to fp32."""

    def __init__(self, fn: Callable[[Tensor], Tensor], precision: str):
        if precision not in _PRECISIONS:
            raise ValueError(f"precision {precision!r} is not supported; use 'bf16', 'fp16' or None")
        self.__wrapped__ = fn
        self.dtype = _PRECISIONS[precision]

    def __call__(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.__wrapped__(x)
        return out.float()


def low_precision(fn: Callable[[Tensor], Tensor], precision: str | None) -> Callable[[Tensor], Tensor]:
    """``fn`` itself for ``precision=None``, else its autocast bf16/fp16 version."""
    return fn if precision is None else LowPrecision(fn, precision)
