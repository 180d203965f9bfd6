"""CIDEr-D equals the COCO caption evaluation (pycocoevalcap), tokenisation included."""

from __future__ import annotations

import random
import re
import shutil

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dvd.eval.captioning import cider, cider_per_image, ptb_tokenize

pycoco_cider = pytest.importorskip("pycocoevalcap.cider.cider")


def coco_cider(references: dict, candidates: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's corpus and per-image CIDEr-D on already tokenised text."""
    score, per_image = pycoco_cider.Cider().compute_score(
        {k: list(v) for k, v in references.items()}, {k: [candidates[k]] for k in references}
    )
    return float(score), [float(s) for s in per_image]


def assert_same_as_coco(references: dict, candidates: dict) -> None:
    expected, expected_per_image = coco_cider(references, candidates)
    ours = cider_per_image(references, candidates)
    assert cider(references, candidates) == pytest.approx(expected, abs=1e-6)
    assert [ours[k] for k in references] == pytest.approx(expected_per_image, abs=1e-6)


BASE_REFS = {
    "cat": ["a cat sitting on a red mat", "a small cat on a mat", "the cat sits on the mat"],
    "dog": ["a dog running in the grass", "a brown dog runs on green grass"],
    "car": ["a blue car parked on the street"],
}

FIXED_CASES = {
    "identical captions": (BASE_REFS, {"cat": "a small cat on a mat", "dog": "a dog running in the grass",
                                       "car": "a blue car parked on the street"}),
    "disjoint captions": (BASE_REFS, {"cat": "two zebras", "dog": "a clock tower", "car": "pizza slice"}),
    "partial overlap": (BASE_REFS, {"cat": "a cat on a bed", "dog": "a dog in the snow", "car": "a red car"}),
    "different reference counts and lengths": (
        {1: ["a man riding a wave on top of a surfboard"] * 2 + ["a surfer rides a big wave", "surfing"],
         2: ["two people"], 3: ["a plate of food with broccoli and rice", "food on a plate"]},
        {1: "a man on a surfboard riding a wave in the ocean", 2: "two people walking", 3: "a plate"}),
    "single image corpus": ({0: ["a red circle next to a blue square"]}, {0: "a red circle"}),
    "repeated words": (
        {0: ["a dog and a dog and a dog", "dog dog dog"], 1: ["a cat a cat", "one cat"]},
        {0: "dog dog dog dog dog dog", 1: "a cat a cat a cat a cat"}),
    "empty candidate": (BASE_REFS, {"cat": "", "dog": "dog", "car": "a car"}),
}


@pytest.mark.parametrize("case", FIXED_CASES, ids=list(FIXED_CASES))
def test_cider_equals_pycocoevalcap_on_fixed_examples(case):
    assert_same_as_coco(*FIXED_CASES[case])


WORDS = st.sampled_from("a the red blue cat dog on in big small two sits".split())
SENTENCE = st.lists(WORDS, min_size=1, max_size=9).map(" ".join)


@st.composite
def corpora(draw):
    n_images = draw(st.integers(1, 6))
    references = {i: draw(st.lists(SENTENCE, min_size=1, max_size=5)) for i in range(n_images)}
    candidates = {i: draw(st.lists(WORDS, min_size=0, max_size=9).map(" ".join)) for i in range(n_images)}
    return references, candidates


@settings(max_examples=60, deadline=None)
@given(corpora())
def test_cider_equals_pycocoevalcap_on_random_corpora(corpus):
    assert_same_as_coco(*corpus)


def test_a_caption_equal_to_its_only_reference_scores_ten_when_no_ngram_is_shared_across_images():
    # Every n-gram order has cosine 1 and no length penalty: 10 * mean over n=1..4 of 1.
    refs = {0: ["red circle on left"], 1: ["blue square at right"], 2: ["green star near top"]}
    scores = cider_per_image(refs, {k: v[0] for k, v in refs.items()})
    assert list(scores.values()) == pytest.approx([10.0, 10.0, 10.0])


def test_a_three_word_caption_has_no_four_grams_so_a_perfect_match_scores_seven_and_a_half():
    refs = {0: ["red circle left"], 1: ["blue square right"]}
    assert cider(refs, {k: v[0] for k, v in refs.items()}) == pytest.approx(7.5)


def test_cider_rewards_overlap_and_penalises_length():
    refs = {0: ["a red circle on the left"], 1: ["a blue square on the right"]}
    exact = cider_per_image(refs, {0: "a red circle on the left", 1: "x"})[0]
    partial = cider_per_image(refs, {0: "a red circle", 1: "x"})[0]
    padded = cider_per_image(refs, {0: "a red circle on the left " + "z " * 8, 1: "x"})[0]
    assert exact > partial > 0 and exact > padded > 0


def test_cider_document_frequencies_come_from_the_evaluated_corpus():
    # Adding an image whose references also say "red" lowers the idf of "red", so the same partial match
    # ("red" right, the shape wrong) scores differently.
    refs = {0: ["a red circle"], 1: ["a blue square"], 2: ["a green star"]}
    alone = cider_per_image(refs, {0: "a red square", 1: "a blue square", 2: "a green star"})[0]
    refs_more = {**refs, 3: ["a red triangle"]}
    more = cider_per_image(refs_more, {0: "a red square", 1: "a blue square", 2: "a green star", 3: "x"})[0]
    assert alone != pytest.approx(more, abs=1e-3)


def test_cider_tokenises_raw_captions_like_coco():
    refs = {0: ["A man riding a wave on top of a surfboard."], 1: ["Two dogs playing, in the grass!"]}
    raw = cider(refs, {0: "A man riding a wave.", 1: "Two DOGS playing in grass"})
    tokenised_refs = {0: ["a man riding a wave on top of a surfboard"], 1: ["two dogs playing in the grass"]}
    tokenised_candidates = {0: "a man riding a wave", 1: "two dogs playing in grass"}
    tokenised = cider(tokenised_refs, tokenised_candidates, tokenize=False)
    assert raw == pytest.approx(tokenised)


TOKENIZE_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("A dog's toy, isn't it? Don't worry!", "a dog 's toy is n't it do n't worry"),
    ('Two people (a man) stand "near" the black-and-white car...',
     "two people -lrb- a man -rrb- stand near the black-and-white car"),
    ("I cannot see Mr. Smith at 3.5 p.m. on 1,000 roads; it's 12:30.",
     "i can not see mr. smith at 3.5 p.m. on 1,000 roads it 's 12:30"),
    ("A 5.5m sign -- the dogs' toys - a $5 hat at 50%", "a 5.5 m sign the dogs toys a $ 5 hat at 50 %"),
    ("\u201cIt\u2019s a cat\u201d \u2014 wow?!", "it 's a cat wow ?!"),
    ("The letter A. The letter b. the end", "the letter a the letter b. the end"),  # an initial keeps its "."
    ("a 2 1/2 inch pipe", "a 2\u00a01/2 inch pipe"),
    ("", ""),
]


@pytest.mark.parametrize(("text", "tokens"), TOKENIZE_CASES)
def test_ptb_tokenize_splits_like_the_stanford_tokenizer(text, tokens):
    assert ptb_tokenize(text) == tokens


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_ptb_tokenize_is_idempotent_so_pre_tokenised_text_is_unchanged(text):
    # PTB keeps "AT&T" whole but splits "at&t", so lowercasing makes a second pass differ there, as in Java.
    assume(re.search(r"[A-Z]&[A-Z]", text) is None)
    once = ptb_tokenize(text)
    assert ptb_tokenize(once) == once


@pytest.mark.parametrize(
    ("references", "candidates", "match"),
    [
        ({0: ["a"]}, {1: "a"}, "same image ids"),
        ({0: []}, {0: "a"}, "non-empty list"),
        ({0: "a cat"}, {0: "a"}, "non-empty list"),
        ({0: ["a"]}, {0: ["a"]}, "must be strings"),
        ({}, {}, "no candidates"),
    ],
)
def test_cider_bad_input_is_a_one_line_error(references, candidates, match):
    with pytest.raises(ValueError, match=match):
        cider(references, candidates)


# --- against the real Java tokenizer, when Java is installed --------------------------------------------

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Stanford PTBTokenizer needs java")

_FUZZ_WORDS = (
    "a man riding wave on top of surfboard two dogs playing with frisbee in the grass red circle blue square"
    " small large near woman kitchen street sign cat sitting bench it its t-shirt black-and-white o'clock"
    " man's dogs don't isn't can't won't it's they're we've she'll he'd i'm cannot gonna 2 10 3.5 1,000"
    " 12:30 1/2 5.5m 3pm 2nd 4x4 u.s a.m mr dr st etc vs inc jr mt ave co e.g i.e miss mass la tex $ % &"
    " # + @home #tag at&t AT&T 1.5-inch covid-19 ph.d x i s m d b c a l j"
).split()
_PREFIXES = ["", "", "", "", "(", '"', "'", "-", "[", "``"]
_SUFFIXES = ["", "", "", "", "", ".", ",", "!", "?", ";", ":", ")", '"', "'", "...", "'s", "?!", "..", "-",
             "]", "''"]
_SEPARATORS = [" ", " ", " ", " ", "  ", " , ", " . ", " - ", " -- "]


def caption_like_lines(count: int, seed: int) -> list[str]:
    """Random caption-like ASCII lines: words, numbers, contractions, abbreviations, punctuation, case."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(1, 12)):
            word = rng.choice(_FUZZ_WORDS)
            word = word.upper() if rng.random() < 0.1 else word.capitalize() if rng.random() < 0.2 else word
            prefix = rng.choice(_PREFIXES)
            if prefix == "'" and word[0].isdigit():  # PTB's '10 vs ' 10 depends on the line position
                prefix = ""
            pieces.append(prefix + word + rng.choice(_SUFFIXES) + rng.choice(_SEPARATORS))
        lines.append("".join(pieces).rstrip())
    return lines


def java_ptb(lines: list[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenised = PTBTokenizer().tokenize({i: [{"caption": line}] for i, line in enumerate(lines)})
    return [tokenised[i][0] for i in range(len(lines))]


@needs_java
def test_ptb_tokenize_equals_the_java_ptb_tokenizer_on_caption_like_text():
    lines = [text for text, _ in TOKENIZE_CASES if text] + caption_like_lines(400, seed=0)
    assert [ptb_tokenize(line) for line in lines] == java_ptb(lines)


@needs_java
def test_cider_on_raw_captions_equals_the_full_coco_pipeline():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references = {
        "a": ["A man riding a wave on top of a surfboard.", "A surfer's riding a BIG wave!",
              "Surfer (in black) rides the wave."],
        "b": ["Two dogs playing with a frisbee in the grass.", "Dogs don't stop playing, do they?"],
        "c": ["A red-and-white sign on St. Mark's street.", "A street sign at 12:30 p.m."],
    }
    candidates = {"a": "A man riding a wave.", "b": "two dogs can't stop playing", "c": "A sign; on a street"}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    expected, _ = pycoco_cider.Cider().compute_score(gts, res)
    assert cider(references, candidates) == pytest.approx(float(expected), abs=1e-6)
