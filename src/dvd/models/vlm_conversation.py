"""Conversations -> token ids for a LLaVA-style model: templates, ``<image>`` expansion, answer-only labels.

A conversation is LLaVA's JSON form: ``[{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt",
"value": "A"}, ...]``. The single ``<image>`` becomes ``num_image_tokens`` copies of the image token id
(the model scatters the projected patch features into those positions, as ``transformers``' LLaVA
does); labels are -100 everywhere except the answer tokens and the EOS that closes each answer.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dvd.config import ConfigError, suggest

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")


@dataclass(frozen=True)
class ConversationTemplate:
    """How turns become text (LLaVA's conversation templates).

    ``plain`` is LLaVA's stage-1 format: the image, then the caption; the human turn is dropped.
    Otherwise ``[system + sep] + "USER: q" + sep + "ASSISTANT:"`` then the answer and EOS, per turn.
    """

    name: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    plain: bool = False

    def segments(self, turns: Sequence[tuple[str, str | None]]) -> list[tuple[str, bool]]:
        """``(text, is_answer)`` pieces for ``(question, answer)`` turns; answer None ends on a prompt."""
        if self.plain:
            answer = turns[0][1]
            return [(IMAGE_TOKEN, False)] + ([(answer, True)] if answer is not None else [])
        pieces: list[tuple[str, bool]] = []
        for index, (question, answer) in enumerate(turns):
            head = self.system + self.sep if index == 0 and self.system else ""
            pieces.append((f"{head}{self.roles[0]}: {question}{self.sep}{self.roles[1]}:", False))
            if answer is not None:
                pieces.append((answer, True))
        return pieces

    def fixed_text(self) -> str:
        """All text the template itself adds (for building a tokenizer's vocabulary)."""
        return " ".join([self.system, *self.roles, ":"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConversationTemplate:
        data = dict(data)
        data["roles"] = tuple(data.get("roles", ("USER", "ASSISTANT")))
        return cls(**data)


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES: dict[str, ConversationTemplate] = {
    # LLaVA-1.5 training and evaluation (Vicuna v1)
    "vicuna_v1": ConversationTemplate("vicuna_v1", system=VICUNA_SYSTEM),
    # the same turns without the system prompt (llava-hf's chat template; shorter for tiny models)
    "vicuna_v1_short": ConversationTemplate("vicuna_v1_short"),
    # LLaVA stage 1 (feature alignment): image then caption
    "plain": ConversationTemplate("plain", roles=("", ""), sep="\n", plain=True),
}


def get_template(template: str | ConversationTemplate) -> ConversationTemplate:
    """A template by name (``vicuna_v1``, ``vicuna_v1_short``, ``plain``) or the template itself."""
    if isinstance(template, ConversationTemplate):
        return template
    if template not in TEMPLATES:
        raise ConfigError(f"unknown conversation template {template!r}{suggest(template, TEMPLATES)}")
    return TEMPLATES[template]


def conversation_turns(conversation: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Validate a LLaVA conversation and return its (question, answer) turns with exactly one ``<image>``.

    Roles must alternate human/gpt starting with human; a conversation without ``<image>`` gets
    ``"<image>\\n"`` prepended to its first question (LLaVA's convention).
    """
    if not conversation or len(conversation) % 2:
        raise ValueError(f"a conversation needs human/gpt pairs, got {len(conversation)} messages")
    turns = []
    for index in range(0, len(conversation), 2):
        human, gpt = conversation[index], conversation[index + 1]
        if _role(human) not in HUMAN_ROLES or _role(gpt) not in GPT_ROLES:
            raise ValueError(
                f"message {index} must be from human and {index + 1} from gpt, "
                f"got {_role(human)!r}, {_role(gpt)!r}"
            )
        question, answer = str(human.get("value", "")).strip(), str(gpt.get("value", "")).strip()
        if IMAGE_TOKEN in answer:
            raise ValueError(f"an answer contains {IMAGE_TOKEN}; the image belongs in the first question")
        turns.append((question, answer))
    count = sum(q.count(IMAGE_TOKEN) for q, _ in turns)
    if count > 1:
        raise ValueError(f"a conversation has {count} {IMAGE_TOKEN} tokens; one image per conversation")
    if count == 0:
        turns[0] = (f"{IMAGE_TOKEN}\n{turns[0][0]}", turns[0][1])
    return turns


def _role(message: Mapping[str, Any]) -> str:
    if not isinstance(message, Mapping):
        raise ValueError(f"a message must be a dict with 'from' and 'value', got {type(message).__name__}")
    return str(message.get("from", message.get("role", ""))).lower()


def make_conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    """A one-turn LLaVA conversation (e.g. a question with a reference or target answer)."""
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


@dataclass
class VLMBatch:
    """Token-side inputs of a VLM batch; ``input_ids`` already hold the expanded image tokens.

    ``labels`` are unshifted (HF convention: ``labels[:, t]`` is predicted from position ``t - 1``);
    ``image_mask`` marks the image-token positions the projected patch features replace.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: str | torch.device, non_blocking: bool = False) -> VLMBatch:
        return VLMBatch(*(t.to(device, non_blocking=non_blocking) for t in dataclasses.astuple(self)))

    def pin_memory(self) -> VLMBatch:
        return VLMBatch(*(t.pin_memory() for t in dataclasses.astuple(self)))

    @property
    def n_answer_tokens(self) -> torch.Tensor:
        """(B,) number of tokens that carry loss."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum(1)


@dataclass
class VLMCollator:
    """Turns conversations (or prompts) into a :class:`VLMBatch`; picklable, for DataLoader workers.

    Training batches are right-padded; generation prompts are left-padded so every row's last
    position is its last prompt token. ``max_length`` truncates on the right (never inside the image).
    With ``num_image_tokens=0`` the image takes no positions: the text around it, for training the
    language model alone (``dvd train lm``).
    """

    tokenizer: Any
    template: ConversationTemplate
    num_image_tokens: int
    image_token_id: int
    max_length: int | None = None
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before building a VLM")

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def encode(self, turns: Sequence[tuple[str, str | None]]) -> tuple[list[int], list[int]]:
        """Token ids and labels of (question, answer) turns; a trailing answer None gives a prompt."""
        bos = self.tokenizer.bos_token_id
        ids: list[int] = [bos] if bos is not None else []
        labels = [IGNORE_INDEX] * len(ids)
        for text, is_answer in self.template.segments(turns):
            tokens = self._expand_image(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if is_answer:
                tokens = tokens + [self.tokenizer.eos_token_id]
            ids += tokens
            labels += tokens if is_answer else [IGNORE_INDEX] * len(tokens)
        if ids.count(self.image_token_id) != self.num_image_tokens:
            raise ValueError(
                f"the tokenizer split {IMAGE_TOKEN} into pieces; add it as a special token "
                "(dvd.models.vlm_tokenizer.ensure_image_token)"
            )
        if self.max_length is not None and len(ids) > self.max_length:
            image_end = len(ids) - ids[::-1].index(self.image_token_id) if self.num_image_tokens else 0
            if image_end > self.max_length:
                raise ConfigError(
                    f"max_length {self.max_length} cuts the image tokens (they end at {image_end}); "
                    "raise max_length"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels

    def _expand_image(self, tokens: list[int]) -> list[int]:
        out: list[int] = []
        for token in tokens:
            out.extend([token] * self.num_image_tokens if token == self.image_token_id else [token])
        return out

    def conversations(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> VLMBatch:
        """Right-padded training batch of LLaVA conversations (malformed ones raise ValueError)."""
        return self.pad([self.encode(conversation_turns(c)) for c in conversations], left=False)

    def pairs(self, prompts: Sequence[str], answers: Sequence[str]) -> VLMBatch:
        """Right-padded batch of one-turn (prompt, answer) conversations (attack targets, references)."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        return self.conversations([make_conversation(p, a) for p, a in zip(prompts, answers, strict=True)])

    def prompts(self, prompts: Sequence[str]) -> VLMBatch:
        """Left-padded generation prompts: each a user message, ending at ``ASSISTANT:``."""
        encoded = []
        for prompt in prompts:
            question = conversation_turns(make_conversation(prompt, ""))[0][0]
            encoded.append(self.encode([(question, None)]))
        return self.pad(encoded, left=True)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, VLMBatch]:
        """DataLoader ``collate_fn`` for ``{"image", "conversations"}`` samples (with ``"encoded"``: their
        ``encode`` result, reused).

        Samples with a malformed conversation or no image (unreadable, or text-only) are skipped and
        counted in ``skipped``.
        """
        images, encoded = [], []
        for sample in samples:
            try:
                if sample.get("image") is None:
                    raise ValueError("no image")
                tokens = sample.get("encoded")  # already encoded by the dataset (training reads it once)
                if tokens is None:
                    tokens = self.encode(conversation_turns(sample["conversations"]))
                encoded.append(tokens)
            except (ValueError, KeyError, TypeError) as error:
                if isinstance(error, ConfigError):
                    raise
                self.skipped += 1
                warnings.warn(f"skipping a sample: {error} (see VLMCollator.skipped)", stacklevel=2)
                continue
            images.append(sample["image"])
        if not encoded:
            raise ValueError(
                f"all {len(samples)} samples in the batch are unusable (malformed or without image)"
            )
        return torch.stack(images), self.pad(encoded, left=False)

    def pad(self, encoded: Sequence[tuple[list[int], list[int]]], *, left: bool = False) -> VLMBatch:
        """A batch of :meth:`encode` results, right-padded (``left``: left-padded)."""
        length = max(len(ids) for ids, _ in encoded)
        batch = len(encoded)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for row, (ids, labs) in enumerate(encoded):
            span = slice(length - len(ids), length) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            labels[row, span] = torch.tensor(labs, dtype=torch.long)
            attention_mask[row, span] = 1
        image_mask = (input_ids == self.image_token_id) & attention_mask.bool()
        return VLMBatch(input_ids, attention_mask, labels, image_mask)
