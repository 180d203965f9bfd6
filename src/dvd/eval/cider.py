"""Captioning metric: corpus CIDEr-D as the COCO caption evaluation computes it.

The COCO evaluation first runs Stanford's PTBTokenizer (Java, ``-lowerCase``) over every caption and
drops punctuation tokens, then scores with CIDEr-D (n-grams 1..4, tf-idf with document frequencies from
the references of the evaluated corpus, clipped cosine similarity, Gaussian length penalty sigma=6,
times 10). :func:`ptb_tokenize` reproduces that tokenisation in Python, so no Java is needed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

__all__ = ["CiderScorer", "cider", "cider_per_image", "clean_and_worst", "ptb_tokenize"]

# Tokens the COCO evaluation removes after PTB tokenisation (PTB spellings of quotes, dashes, periods...).
_DROPPED = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})
_SYMBOLS = {'"': "''", "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Words PTB splits in two.
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}
# Abbreviations whose final period stays attached (PTB 3.4.1's hand-made WSJ lists, checked against the jar).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev maj sgt cpl"
    " pvt mt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det mme mlle jr sr bros blvd"
    " rd esq inc co cos corp pty ptys mfg mtg ltd plc bancorp dept bhd assn univ intl sys invt elec natl etc"
    " al seq vs wm jos cie cf treas alex ph ph.d jan feb mar apr jun jul aug sep sept oct nov dec mon tue"
    " tues wed thu thurs fri ala ariz calif colo conn fla ga ind kan kans ky md mich minn mo mont neb nev"
    " okla penn tenn va vt wis wyo ft sq est".split()
)
# ... and those that are abbreviations only when capitalised (otherwise they are ordinary words).
_CAPITALISED_ABBREVIATIONS = frozenset("miss ark del ill la mass ore pa tex wash m".split())
_ACRONYM = re.compile(r"[A-Za-z](?:\.[A-Za-z])+")
# After an initial ("X."), these capitalised words start a new sentence, so PTB splits the period off.
_SENTENCE_STARTERS = frozenset(
    "the a an this it he she we they in there but then that these her our their what when if as at one some"
    " many so while after now here however yet since such other last you once earlier".split()
)
_NEXT_WORD = re.compile(r"\s+(M[rsRS]\.(?![^\W_])|[A-Za-z]+(?=\s|$))")
_UNICODE = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "--",
        "\u2014": "--",
        "\u00a0": " ",
        "\n": " ",
        "\r": " ",
        "\t": " ",
    }
)
_W = r"[^\W_]"  # a letter or digit (any script)
_LEXER = re.compile(
    rf"""
      (?P<space>\s+)
    | (?P<bracket>-(?i:lrb|rrb|lsb|rsb|lcb|rcb)-)             # already PTB-tokenised brackets
    | (?P<clitic>'(?i:n')|'(?i:s|re|ve|ll|d|m|em|n)(?!{_W}))  # split-off clitic: "man 's", "'n'"
    | (?P<decade>'[2-9]0s(?!{_W}))                           # '90s
    | (?P<fraction>\d{{1,4}}[ ]\d{{1,4}}/\d{{1,4}})  # "2 1/2": one token, no-break space inside
    | (?P<dashes>--+)
    | (?P<signed>-\d+(?:[.,:]\d+)*)                          # -2, -3.5 (letters after it split off)
    | (?P<amp>[A-Z]+(?:&[A-Z]+)+(?!{_W}))                    # AT&T
    | (?P<word>{_W}+(?:(?:[-/.]|(?<=\d)[,:](?=\d)|'(?![nN]'|[nN](?!{_W}))(?={_W})){_W}+)*)
    | (?P<decimal>\.\d+)                                     # .5
    | (?P<periods>\.+)
    | (?P<marks>[!?]+)
    | (?P<tag>[#@][^\W\d_]{_W}*)                             # #tag, @name
    | (?P<other>.)
    """,
    re.VERBOSE,
)
_NUMBER_THEN_LETTERS = re.compile(r"\d+(?:[.,:]\d+)+(?=[^\W\d_])")
_CLITIC_SUFFIX = re.compile(r"(?i)(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def _keeps_period(word: str, text: str, end: int) -> bool:
    """Whether PTB keeps the period after ``word`` (``text[end] == '.'``) as part of the token."""
    lower = word.lower()
    if _ACRONYM.fullmatch(word) or lower in _ABBREVIATIONS:
        return True
    if lower in _CAPITALISED_ABBREVIATIONS and word[0].isupper():
        return True
    if len(word) == 1 and word.isascii() and word.isalpha():  # an initial, unless a sentence starts next
        if (m := _NEXT_WORD.match(text, end + 1)) is None:
            return True
        following = m.group(1)
        if following.endswith("."):
            return following not in ("Mr.", "MR.", "Ms.")
        return not (following.lower() in _SENTENCE_STARTERS and (following.istitle() or following.isupper()))
    return False


def _split_clitics(word: str) -> list[str]:
    """``don't`` -> ``do n't``, ``man's`` -> ``man 's``, ``cannot`` -> ``can not`` (PTB conventions)."""
    if word.lower() in _SPLIT_WORDS:
        first, second = _SPLIT_WORDS[word.lower()]
        return [word[: len(first)], word[len(first) :]]
    tail: list[str] = []
    while (m := _CLITIC_SUFFIX.fullmatch(word)) is not None:
        word, tail = m.group(1), [m.group(2), *tail]
    return [word, *tail]


def ptb_tokenize(text: str) -> str:
    """Tokenise one caption like the COCO evaluation (PTBTokenizer -lowerCase, punctuation dropped).

    Returns the tokens joined by single spaces. Matches the Stanford CoreNLP 3.4.1 jar that the COCO
    evaluation runs on caption-like text (words, numbers, contractions, abbreviations and initials, hyphens,
    quotes, brackets, symbols; checked against the jar on fuzzed captions in the tests). Brackets stay as
    ``-lrb-`` etc. and "2 1/2" as one token, as there. Known differences, all rare in captions: emoticons
    (``:)``), ``y'all``, ``'tis``, ``3p.m.``, all-caps company abbreviations (``MFG.``).
    """
    text = text.translate(_UNICODE)
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _LEXER.match(text, pos)
        assert m is not None  # the `other` alternative matches any character
        kind, token, pos = m.lastgroup, m.group(), m.end()
        if kind in ("space", "periods", "dashes"):  # PTB splits these runs into tokens that are all dropped
            continue
        if kind == "word":
            if (num := _NUMBER_THEN_LETTERS.match(token)) is not None:  # "5.5m" -> "5.5 m"
                token, pos = num.group(), m.start() + num.end()
            elif text.startswith(".", pos) and _keeps_period(token, text, pos):
                tokens.append(token + ".")
                pos += 1
                continue
            elif token in ("d", "D", "l", "L", "j", "J") and text.startswith("'", pos):  # elision: d', l'
                tokens.append(token + "'")
                pos += 1
                continue
            tokens.extend(_split_clitics(token))
        elif kind == "fraction":
            tokens.append(token.replace(" ", "\u00a0"))
        elif kind == "other":
            tokens.append(_SYMBOLS.get(token, token))
        else:
            tokens.append(token)
    return " ".join(t for t in (t.lower() for t in tokens) if t not in _DROPPED)


def _ngram_counts(tokens: list[str], n: int) -> list[Counter[tuple[str, ...]]]:
    """Term frequencies of the 1..n-grams of a token list, one Counter per order."""
    return [Counter(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, n + 1)]


class _TfIdf:
    """tf-idf vectors (one sparse dict per n-gram order) with their L2 norms."""

    __slots__ = ("vectors", "norms", "length")

    def __init__(self, tokens: list[str], n: int, idf: Mapping[tuple[str, ...], float], default: float):
        counts = _ngram_counts(tokens, n)
        self.vectors = [{g: tf * idf.get(g, default) for g, tf in c.items()} for c in counts]
        self.norms = [math.sqrt(sum(w * w for w in v.values())) for v in self.vectors]
        # The COCO code counts bigrams (len - 1) instead; the difference of two lengths is the same unless a
        # caption is empty, and an empty caption's similarity is 0 whatever the penalty.
        self.length = len(tokens)


def _similarity(hyp: _TfIdf, ref: _TfIdf, sigma: float) -> float:
    """Sum over n-gram orders of the clipped cosine similarity times the Gaussian length penalty."""
    penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2 * sigma**2))
    total = 0.0
    for h, r, hn, rn in zip(hyp.vectors, ref.vectors, hyp.norms, ref.norms, strict=True):
        if hn == 0 or rn == 0:
            continue  # all weights are >= 0, so the dot product is 0 as well
        dot = sum(min(w, r[g]) * r[g] for g, w in h.items() if g in r)  # CIDEr-D clipping
        total += dot / (hn * rn)
    return total * penalty


class CiderScorer:
    """CIDEr-D of single captions against a fixed corpus of references (the idf is computed once).

    ``scorer(key, caption)`` equals ``cider_per_image(references, candidates)[key]`` for any candidates
    over the same images: the document frequencies depend on the references only. Used to pick, per
    image, the worst attacked caption while an evaluation is still running.
    """

    def __init__(
        self,
        references: Mapping[Hashable, Sequence[str]],
        *,
        n: int = 4,
        sigma: float = 6.0,
        tokenize: bool = True,
    ) -> None:
        if not references:
            raise ValueError("cider: no candidates; pass at least one image id -> caption")
        if n < 1 or sigma <= 0:
            raise ValueError(f"cider: need n >= 1 and sigma > 0, got n={n}, sigma={sigma}")
        self.n, self.sigma, self.tokenize = n, sigma, tokenize
        refs_tokens: dict[Hashable, list[list[str]]] = {}
        for key, refs in references.items():
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"cider: image {key!r} needs a non-empty list of reference captions")
            refs_tokens[key] = [self._words(r) for r in refs]
        # Document frequency: in how many images' reference sets each n-gram occurs.
        document_frequency: Counter[tuple[str, ...]] = Counter()
        for refs in refs_tokens.values():
            document_frequency.update({g for r in refs for c in _ngram_counts(r, n) for g in c})
        self._log_images = math.log(len(references))
        self._idf = {g: self._log_images - math.log(df) for g, df in document_frequency.items()}  # df >= 1
        # An n-gram absent from every reference gets df = 1 (log 1 = 0), as in the COCO code.
        self._references = {
            key: [_TfIdf(r, n, self._idf, self._log_images) for r in refs]
            for key, refs in refs_tokens.items()
        }

    def _words(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise ValueError(f"cider: captions must be strings, got {type(text).__name__} ({text!r:.60})")
        return (ptb_tokenize(text) if self.tokenize else text).split()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._references

    def __call__(self, key: Hashable, caption: str) -> float:
        """CIDEr-D of ``caption`` for image ``key`` (mean over n-gram orders and references, times 10)."""
        refs = self._references[key]
        hyp = _TfIdf(self._words(caption), self.n, self._idf, self._log_images)
        total = sum(_similarity(hyp, ref, self.sigma) for ref in refs)
        return 10.0 * total / (self.n * len(refs))


def cider_per_image(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    *,
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> dict[Hashable, float]:
    """CIDEr-D of every candidate caption against its image's references, within this corpus.

    Document frequencies (the idf) come from the references of exactly these images, as in the COCO
    evaluation, so a score depends on the whole corpus. ``tokenize=False`` takes the text as already
    tokenised (split on whitespace only).
    """
    if not candidates:
        raise ValueError("cider: no candidates; pass at least one image id -> caption")
    if set(references) != set(candidates):
        missing = [k for k in candidates if k not in references][:3]
        extra = [k for k in references if k not in candidates][:3]
        raise ValueError(
            f"cider: references and candidates must have the same image ids "
            f"(no references for {missing}, no candidate for {extra})"
        )
    scorer = CiderScorer({k: references[k] for k in candidates}, n=n, sigma=sigma, tokenize=tokenize)
    return {key: scorer(key, caption) for key, caption in candidates.items()}


def clean_and_worst(
    references: Mapping[Hashable, Sequence[str]], outputs: Mapping[Hashable, Sequence[str]]
) -> dict[Hashable, tuple[float, float]]:
    """Per image of ``outputs`` (its clean caption first, then the attacked ones): the clean caption's
    CIDEr-D and the lowest of all, with the idf of these images' ``references``."""
    scorer = CiderScorer({k: references[k] for k in outputs})
    scores = {}
    for key, texts in outputs.items():
        per_output = [scorer(key, text) for text in texts]
        scores[key] = (per_output[0], min(per_output))
    return scores


Captions = Mapping[Hashable, str]


def cider(references: Mapping[Hashable, Sequence[str]], candidates: Captions, **options: Any) -> float:
    """Corpus CIDEr-D (the number COCO reports, not times 100): the mean of :func:`cider_per_image`, which
    takes the same arguments (``n``, ``sigma``, ``tokenize``)."""
    scores = cider_per_image(references, candidates, **options)
    return sum(scores.values()) / len(scores)
