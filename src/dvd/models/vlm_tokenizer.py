"""Tokenizers for the VLM: the small world's word-level tokenizer, and ``<image>`` for any HF tokenizer.

The small world's tokenizer is built offline from its own text (captions, questions, answers and
the conversation template's words) with the ``tokenizers`` library: lowercase, one id per word or
punctuation mark. It is a ``transformers`` fast tokenizer, so it saves and loads with
``save_pretrained`` / ``AutoTokenizer`` beside the model. Real runs use the LM's own tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AddedToken, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dvd.config import ConfigError
from dvd.models.vlm_conversation import IMAGE_TOKEN, ConversationTemplate, get_template

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE_TOKEN)
# JSON keys whose string values are natural-language text in LLaVA / COCO / VQAv2 / POPE files
TEXT_KEYS = frozenset(
    {"value", "caption", "captions", "raw", "question", "answer", "multiple_choice_answer", "text", "label"}
)


def build_tokenizer(
    texts: Iterable[str],
    *,
    templates: Sequence[str | ConversationTemplate] = ("vicuna_v1", "vicuna_v1_short", "plain"),
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over ``texts`` plus the templates' own words.

    Ids 0-4 are ``<pad> <s> </s> <unk> <image>``; words split on whitespace and punctuation
    (``"a red circle."`` -> ``a red circle .``); decoding rejoins them and removes the space before
    punctuation. Words seen fewer than ``min_frequency`` times map to ``<unk>``.
    """
    fixed = [get_template(t).fixed_text() for t in templates]
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # join with spaces, tidy punctuation
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=min_frequency)
    tokenizer.train_from_iterator(_chain(fixed, texts), trainer=trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise ConfigError("no words to build a tokenizer from; pass the small world's captions and questions")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IMAGE_TOKEN],
        clean_up_tokenization_spaces=False,
    )


def _chain(first: Iterable[str], rest: Iterable[str]) -> Iterator[str]:
    yield from first
    for text in rest:
        if not isinstance(text, str):
            raise ValueError(f"tokenizer texts must be strings, got {type(text).__name__}")
        yield text


def texts_from_files(paths: Iterable[str | Path], *, keys: frozenset[str] = TEXT_KEYS) -> Iterator[str]:
    """Every string under ``keys`` in JSON / JSON-lines files (LLaVA, COCO captions, VQAv2, POPE)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (tokenizer text source)")
        text = path.read_text()
        try:
            records: list[Any] = [json.loads(text)]
        except json.JSONDecodeError:
            try:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: neither JSON nor JSON lines ({error.msg})") from None
        for record in records:
            yield from _strings(record, keys, inside=False)


def _strings(node: Any, keys: frozenset[str], *, inside: bool) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, keys, inside=key in keys)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value, keys, inside=inside)
    elif isinstance(node, str) and inside:
        yield node


def ensure_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add ``<image>`` as a special token if missing; return its id (the LM never embeds it)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"] != [image_id]:
        raise ConfigError(f"the tokenizer splits {IMAGE_TOKEN}; register it as a special token")
    return image_id
