"""The ΔCLIP tokenizer gives the authors' ids (hand-checked against the vocabulary's line numbers)."""

from __future__ import annotations

import pytest
import torch

from dvd.models.delta_tokenizer import DeltaTokenizer, packaged_vocab

PAD, BOS, EOS, UNK, CLS = 0, 1, 2, 100, 101
# line number - 1 in bert_base_vocab_bos_eos.txt
A, PHOTO, OF, CAT, DOG, DOT, COMMA, BANG = 1037, 6302, 1997, 4937, 3899, 1012, 1010, 999


@pytest.fixture(scope="module")
def tokenizer() -> DeltaTokenizer:
    return DeltaTokenizer(context_length=12)


def test_packaged_vocabulary_is_bert_uncased_with_bos_eos_renamed() -> None:
    lines = packaged_vocab().read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30522
    assert lines[:3] == ["[PAD]", "[bos]", "[eos]"] and lines[100:102] == ["[UNK]", "[CLS]"]
    assert (packaged_vocab().parent / "README.md").is_file()


def test_a_text_is_bos_pieces_eos_zero_padded_then_cls_last(tokenizer) -> None:
    ids = tokenizer("a photo of a cat.")
    assert ids.dtype == torch.long and ids.shape == (1, 12)
    assert ids[0].tolist() == [BOS, A, PHOTO, OF, A, CAT, DOT, EOS, PAD, PAD, PAD, CLS]


def test_empty_text_is_bos_eos(tokenizer) -> None:
    assert tokenizer([""])[0].tolist() == [BOS, EOS] + [PAD] * 9 + [CLS]
    assert tokenizer(" \t\n")[0].tolist() == [BOS, EOS] + [PAD] * 9 + [CLS]


def test_punctuation_splits_off_and_case_and_accents_fold(tokenizer) -> None:
    assert tokenizer.encode("Dog, CAT!") == [DOG, COMMA, CAT, BANG]
    assert tokenizer.encode("don't") == [2123, 1005, 1056]  # don ' t
    assert tokenizer.encode("Café NAÏVE") == [7668, 15743]  # cafe naive
    assert tokenizer.encode("Straße") == [2358, 8180, 3366]  # full case folding: strasse -> st ##ras ##se
    assert tokenizer.encode("का") == [1315, 29876]  # only Mn marks go: the Mc vowel sign stays (क ##ा)


def test_cjk_characters_are_single_tokens_and_emoji_unknown(tokenizer) -> None:
    assert tokenizer.words("中国猫") == ["中", "国", "猫"]
    assert tokenizer.encode("中国") == [1746, 1799]
    assert tokenizer.encode("cat 😀 dog") == [CAT, UNK, DOG]


def test_words_over_100_bytes_and_unsplittable_words_are_unknown(tokenizer) -> None:
    assert tokenizer.encode("x" * 101) == [UNK]
    assert tokenizer.encode("a\u00a0b") == [UNK]  # RE2's \s is ASCII only: one word, no WordPiece split


def test_control_and_format_characters_become_spaces(tokenizer) -> None:
    assert tokenizer.encode("cat\u200bdog") == [CAT, DOG]  # zero-width space (Cf)
    assert tokenizer.encode("cat\x00dog\x0bcat") == [CAT, DOG, CAT]  # NUL and vertical tab (Cc)
    assert tokenizer.encode("é" * 60) == [25212] + [4402] * 29  # 60 bytes once accents are stripped


def test_long_text_is_truncated_with_eos_in_the_last_slot_before_cls(tokenizer) -> None:
    long = "one two three four five six seven eight nine ten eleven"
    ids = tokenizer(long)[0].tolist()
    assert ids == [BOS, 2028, 2048, 2093, 2176, 2274, 2416, 2698, 2809, 3157, EOS, CLS]


def test_batch_follows_the_authors_row_zero_rule_for_the_final_eos(tokenizer) -> None:
    long = "one two three four five six seven eight nine ten"
    first_long = tokenizer([long, "a"]).tolist()
    assert first_long[1] == [BOS, A, EOS] + [PAD] * 7 + [EOS, CLS]  # forced, as tf.cond on row 0 does
    first_short = tokenizer(["a", long]).tolist()
    assert first_short[1] == [BOS, 2028, 2048, 2093, 2176, 2274, 2416, 2698, 2809, 3157, 2702, CLS]
    assert torch.equal(tokenizer(["a", "a photo"])[1], tokenizer("a photo")[0])


def test_context_length_can_be_given_per_call(tokenizer) -> None:
    assert tokenizer("a cat", context_length=6)[0].tolist() == [BOS, A, CAT, EOS, PAD, CLS]
