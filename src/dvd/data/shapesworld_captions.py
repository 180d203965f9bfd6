"""ShapesWorld captions: several sentence templates per scene, each naming what the image holds."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dvd.data.shapesworld_scenes import (
    NUMBER_WORDS,
    POSITION_PHRASES,
    SPEC,
    Scene,
    SceneObject,
    ShapesWorldSpec,
    pick,
)


def plural(shape: str) -> str:
    return shape + "es" if shape.endswith(("ss", "x", "sh")) or shape == "cross" else shape + "s"


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else plural(shape)


def _number(count: int, rng: np.random.Generator) -> str:
    return ("a" if rng.random() < 0.6 else "one") if count == 1 else NUMBER_WORDS[count]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _texture_word(texture: str, rng: np.random.Generator, *, solid: str = "") -> str:
    words = {"solid": (solid,), "striped": ("striped",), "dotted": ("dotted", "spotted")}[texture]
    return pick(rng, words)


def _background_phrase(background: str, rng: np.random.Generator) -> str:
    if background == "noise":
        return pick(rng, ("a noisy background", "a grainy background"))
    if background == "gradient":
        return pick(rng, ("a gradient background", "a shaded background"))
    return f"a {background} background"


def _distractor_phrase(d: SceneObject, rng: np.random.Generator) -> str:
    words = [d.size if rng.random() < 0.4 else "", d.color, d.shape]
    return " ".join(w for w in words if w)


def _join(*words: str) -> str:
    return " ".join(w for w in words if w)


def _t_full(s: Scene, rng: np.random.Generator) -> str:
    num = _number(s.count, rng)
    text = _join(num, s.size, s.color, _texture_word(s.texture, rng), _noun(s.shape, s.count))
    if s.distractor is not None:
        d = _distractor_phrase(s.distractor, rng)
        text += f" and {_article(d)} {d}"
    return f"{text} on {_background_phrase(s.background, rng)}"


def _t_picture(s: Scene, rng: np.random.Generator) -> str:
    lead = pick(rng, ("a picture of", "a photo of", "an image of"))
    if s.count == 1:
        adjective = _join(s.color, _texture_word(s.texture, rng))
        where = POSITION_PHRASES[s.position or "center"]
        return f"{lead} {_article(adjective)} {adjective} {s.shape} {where}"
    return f"{lead} {NUMBER_WORDS[s.count]} {s.color} {plural(s.shape)}"


def _t_there_are(s: Scene, rng: np.random.Generator) -> str:
    verb = "is" if s.count == 1 else "are"
    text = f"there {verb} {_number(s.count, rng)} {_join(s.size, _noun(s.shape, s.count))} in the image"
    if s.distractor is not None:
        text += f", and one {s.distractor.shape}"
    return text


def _t_pattern(s: Scene, rng: np.random.Generator) -> str:
    base = _join(_number(s.count, rng), s.color, _noun(s.shape, s.count))
    if s.texture == "solid":
        return _join(_number(s.count, rng), "solid", s.color, _noun(s.shape, s.count))
    return f"{base} with {'stripes' if s.texture == 'striped' else 'dots'}"


def _t_background_first(s: Scene, rng: np.random.Generator) -> str:
    bg = _background_phrase(s.background, rng)
    return f"{bg} with {_join(_number(s.count, rng), s.size, _noun(s.shape, s.count))}"


def _t_next_to(s: Scene, rng: np.random.Generator) -> str:
    text = _join(_number(s.count, rng), s.color, _texture_word(s.texture, rng), _noun(s.shape, s.count))
    if s.distractor is not None:
        d = _distractor_phrase(s.distractor, rng)
        text += f" next to {_article(d)} {d}"
    return text


def _t_colored(s: Scene, rng: np.random.Generator) -> str:
    lead = pick(rng, ("a simple drawing of", "a sketch of", "a cartoon of"))
    text = f"{lead} {_join(_number(s.count, rng), _texture_word(s.texture, rng), _noun(s.shape, s.count))}"
    text += f" colored {s.color}"
    if s.distractor is not None:
        text += f" and a {s.distractor.color} {s.distractor.shape}"
    return text


def _t_size(s: Scene, rng: np.random.Generator) -> str:
    if s.count == 1:
        return f"{_article(s.size)} {s.size} {s.color} {s.shape}"
    return f"{s.size} {s.color} {plural(s.shape)}, {NUMBER_WORDS[s.count]} of them"


CAPTION_TEMPLATES = (
    _t_full,
    _t_picture,
    _t_there_are,
    _t_pattern,
    _t_background_first,
    _t_next_to,
    _t_colored,
    _t_size,
)


def _sentence(text: str) -> str:
    text = text.replace("  ", " ").strip()
    return text[0].upper() + text[1:] + "."


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption, from a random template."""
    return _sentence(pick(rng, CAPTION_TEMPLATES)(scene, rng))


HARD_CAPTION_NAMES = ("count", "size", "color", "texture", "shape")


def hard_caption(scene: Scene, rng: np.random.Generator, keep: Mapping[str, float]) -> str:
    """A caption naming attribute ``a`` with probability ``keep[a]``: "Two star shapes.", "Striped shapes."

    One draw per attribute with a probability strictly between 0 and 1 (count, size, color, texture, shape
    order). The shape is named unless ``keep["shape"]`` is below 1 (then "shapes" stands for it, so that
    some captions are matched by, e.g., the texture alone). The shape word stays singular, as in the
    zero-shot prompts; without the count it is "star shapes".
    """
    unknown = set(keep) - set(HARD_CAPTION_NAMES)
    if unknown:
        choices = list(HARD_CAPTION_NAMES)
        raise ValueError(f"hard_caption_keep: unknown {sorted(unknown)}; choose from {choices}")
    named = set()
    for name in HARD_CAPTION_NAMES:
        p = float(keep.get(name, 1.0 if name == "shape" else 0.0))
        if p >= 1.0 or (p > 0.0 and rng.random() < p):
            named.add(name)
    count, shape = "count" in named, scene.shape if "shape" in named else ""
    if count and scene.count == 1:
        noun = shape or "shape"
    else:
        noun = f"{shape} shapes"
    words = [_number(scene.count, rng) if count else ""]
    words += [getattr(scene, name) if name in named else "" for name in ("size", "color", "texture")]
    return _sentence(_join(*words, noun))


def pretrain_caption(scene: Scene, rng: np.random.Generator, spec: ShapesWorldSpec = SPEC) -> str:
    """A pre-training caption; with ``spec.hard_caption_prob``, a hard one (:func:`hard_caption`)."""
    if spec.hard_caption_prob > 0 and rng.random() < spec.hard_caption_prob:
        return hard_caption(scene, rng, spec.hard_caption_keep)
    return caption(scene, rng)


def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` different captions (distinct templates), as COCO's several references per image."""
    order = rng.permutation(len(CAPTION_TEMPLATES))
    out: list[str] = []
    for i in order:
        text = _sentence(CAPTION_TEMPLATES[int(i)](scene, rng))
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out
