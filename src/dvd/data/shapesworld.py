"""ShapesWorld: a small procedurally generated image-text world written in the field's real formats.

Every image holds one *main group* -- ``count`` copies (1-4) of one shape in one colour, size and
texture -- on a neutral background (plain white/black/gray, gray noise or a gray gradient), and a
fraction of images add one *distractor* object of a different shape and a different colour. Object
colours are saturated and backgrounds neutral, so "the colour of the image" is always the main
group's (or, with a distractor, one of two named colours). Shapes follow a skewed prior and the
distractor prefers each shape's "companions": this gives POPE's popular and adversarial negatives
something real to measure.

``dvd data shapesworld --out DIR`` writes (file names in every JSON are relative to ``DIR/images``)::

  DIR/summary.json                    seed, image size, spec, per-file counts and bytes
  DIR/pretrain/shard-000000.tar ...   webdataset pairs KEY.png, KEY.txt (caption), KEY.json (attributes)
  DIR/pretrain/shards.txt             one shard name per line (brace pattern in summary.json)
  DIR/zeroshot/{shape,color,count,size,texture}/
      classnames.txt, zeroshot_classification_templates.txt, test/0.tar (KEY.png, KEY.cls),
      test/nshards.txt                CLIP_benchmark's webdataset layout; no distractors
  DIR/images/train/<id:012d>.png      training images of the LLaVA sets (and Karpathy "train")
  DIR/images/test/<id:012d>.png       held-out images of the COCO / VQAv2 / POPE sets
  DIR/images/scenes.json              every train/test image's attributes and objects (ground truth)
  DIR/captions/annotations.json       COCO captions (images + annotations, 5 references per image)
  DIR/captions/karpathy_split.json    dataset_coco.json style; test images split into "val" and "test"
  DIR/vqa/questions.json, annotations.json   VQAv2 (10 answers each; entries also carry "image")
  DIR/pope/pope_{random,popular,adversarial}.jsonl
  DIR/llava/stage1_captions.json, stage2_instruct.json

Same seed -> byte-identical files (fixed PNG settings, sorted JSON keys, fixed tar headers); all
randomness comes from ``numpy.random.Generator(PCG64([seed, stream, index]))``.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dvd.config import ConfigError

SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges at any image size
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITION_PHRASES = {
    "center": "in the center",
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
    "top left": "at the top left",
    "top right": "at the top right",
    "bottom left": "at the bottom left",
    "bottom right": "at the bottom right",
}


@dataclass(frozen=True)
class ShapesWorldSpec:
    """The vocabulary of the world and the priors scenes are drawn from."""

    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon")
    shape_weights: tuple[float, ...] = (0.20, 0.17, 0.15, 0.13, 0.11, 0.09, 0.08, 0.07)
    # distractor shapes that co-occur with each main shape more often than chance (POPE adversarial)
    companions: dict[str, tuple[str, str]] = field(
        default_factory=lambda: {
            "circle": ("square", "hexagon"),
            "square": ("circle", "diamond"),
            "triangle": ("star", "diamond"),
            "star": ("triangle", "heart"),
            "cross": ("square", "star"),
            "heart": ("star", "circle"),
            "diamond": ("triangle", "square"),
            "hexagon": ("circle", "cross"),
        }
    )
    colors: dict[str, tuple[int, int, int]] = field(
        default_factory=lambda: {
            "red": (220, 40, 40),
            "orange": (245, 145, 30),
            "yellow": (240, 220, 40),
            "green": (50, 170, 70),
            "cyan": (40, 200, 210),
            "blue": (40, 80, 220),
            "purple": (140, 60, 190),
            "pink": (250, 120, 190),
        }
    )
    sizes: dict[str, float] = field(default_factory=lambda: {"small": 0.095, "large": 0.19})  # radius / side
    textures: tuple[str, ...] = ("solid", "striped", "dotted")
    texture_weights: tuple[float, ...] = (0.5, 0.25, 0.25)
    counts: tuple[int, ...] = (1, 2, 3, 4)
    # where a single object sits (fractions of the side); groups of 2-4 use grid slots instead
    positions: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "top left": (0.23, 0.23),
            "top": (0.5, 0.23),
            "top right": (0.77, 0.23),
            "left": (0.23, 0.5),
            "center": (0.5, 0.5),
            "right": (0.77, 0.5),
            "bottom left": (0.23, 0.77),
            "bottom": (0.5, 0.77),
            "bottom right": (0.77, 0.77),
        }
    )
    backgrounds: dict[str, float | None] = field(
        default_factory=lambda: {
            "white": 0.95,
            "black": 0.07,
            "gray": 0.5,
            "noise": None,
            "gradient": None,
        }
    )
    background_weights: tuple[float, ...] = (0.25, 0.15, 0.2, 0.2, 0.2)
    distractor_prob: float = 0.4

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


SPEC = ShapesWorldSpec()


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: centre (x, y) and radius as fractions of the image side."""

    shape: str
    color: str
    size: str
    texture: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A scene's labels (the main group) and the objects actually drawn (main group first)."""

    shape: str
    color: str
    size: str
    texture: str
    count: int
    position: str | None  # only for count == 1
    background: str
    objects: tuple[SceneObject, ...]
    distractor: SceneObject | None = None

    @property
    def present_shapes(self) -> list[str]:
        return [self.shape] + ([self.distractor.shape] if self.distractor else [])

    def to_json(self) -> dict[str, Any]:
        """All attributes as plain JSON (each pre-training sample's KEY.json); exact, so it re-renders."""
        objects = [
            {
                "shape": o.shape,
                "color": o.color,
                "size": o.size,
                "texture": o.texture,
                "x": o.x,
                "y": o.y,
                "radius": o.radius,
            }
            for o in self.objects
        ]
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "texture": self.texture,
            "count": self.count,
            "position": self.position,
            "background": self.background,
            "objects": objects,
            "distractor": objects[-1] if self.distractor is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Scene:
        """The scene written by :meth:`to_json` (a KEY.json or an entry of images/scenes.json)."""
        fields = ("shape", "color", "size", "texture", "x", "y", "radius")
        objects = tuple(SceneObject(*(o[f] for f in fields)) for o in data["objects"])
        return cls(
            data["shape"],
            data["color"],
            data["size"],
            data["texture"],
            int(data["count"]),
            data["position"],
            data["background"],
            objects,
            objects[-1] if data.get("distractor") is not None else None,
        )


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator for one sample: independent of generation order and of the other streams."""
    return np.random.Generator(np.random.PCG64([seed, stream, index]))


def _pick(rng: np.random.Generator, items: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """One of ``items``, uniformly or with (unnormalised) ``weights``."""
    if weights is None:
        return items[int(rng.integers(len(items)))]
    cumulative = list(itertools.accumulate(weights))
    return items[min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(items) - 1)]


def sample_scene(rng: np.random.Generator, spec: ShapesWorldSpec = SPEC, **fixed: Any) -> Scene:
    """Draw a scene; keyword arguments fix attributes (``shape="star"``, ``distractor=False``, ...)."""
    allowed = {"shape", "color", "size", "texture", "count", "position", "background", "distractor"}
    unknown = set(fixed) - allowed
    if unknown:
        raise ValueError(f"sample_scene: unknown attribute(s) {sorted(unknown)}")
    shape = fixed.get("shape") or _pick(rng, spec.shapes, spec.shape_weights)
    color = fixed.get("color") or _pick(rng, list(spec.colors))
    size = fixed.get("size") or _pick(rng, list(spec.sizes))
    texture = fixed.get("texture") or _pick(rng, spec.textures, spec.texture_weights)
    count = int(fixed.get("count") or (1 if fixed.get("position") else _pick(rng, spec.counts)))
    background = fixed.get("background") or _pick(rng, list(spec.backgrounds), spec.background_weights)
    for name, value, choices in (
        ("shape", shape, spec.shapes),
        ("color", color, spec.colors),
        ("size", size, spec.sizes),
        ("texture", texture, spec.textures),
        ("count", count, spec.counts),
        ("background", background, spec.backgrounds),
    ):
        if value not in choices:
            raise ValueError(f"sample_scene: {name} {value!r} is not one of {list(choices)}")
    if fixed.get("position") and count != 1:
        raise ValueError(f"sample_scene: position is only defined for count=1, got count={count}")
    radius = spec.sizes[size]
    position = None
    if count == 1:
        position = fixed.get("position") or _pick(rng, list(spec.positions))
        centres = [spec.positions[position]]
    else:
        # groups use grid slots spaced so that jittered neighbours never touch
        grid = (0.25, 0.75) if radius > 0.12 else (0.18, 0.5, 0.82)
        slots = [(x, y) for y in grid for x in grid]
        chosen = rng.choice(len(slots), size=count, replace=False)
        centres = [slots[int(i)] for i in chosen]
    objects = []
    for cx, cy in centres:
        jx, jy = rng.uniform(-0.015, 0.015, 2)
        r = radius * float(rng.uniform(0.95, 1.05))
        objects.append(SceneObject(shape, color, size, texture, float(cx + jx), float(cy + jy), r))
    distractor = None
    want = fixed.get("distractor")
    if want is None:
        want = bool(rng.random() < spec.distractor_prob)
    if want:
        distractor = _place_distractor(rng, spec, shape, color, objects)
    if distractor is not None:
        objects.append(distractor)
    return Scene(shape, color, size, texture, count, position, background, tuple(objects), distractor)


def _place_distractor(
    rng: np.random.Generator, spec: ShapesWorldSpec, shape: str, color: str, objects: list[SceneObject]
) -> SceneObject | None:
    """A different shape and colour placed where it overlaps nothing, or None if there is no room."""
    others = [s for s in spec.shapes if s != shape]
    companions = spec.companions.get(shape, ())
    d_shape = _pick(rng, companions) if companions and rng.random() < 0.6 else _pick(rng, others)
    d_color = _pick(rng, [c for c in spec.colors if c != color])
    d_size = _pick(rng, list(spec.sizes))
    d_texture = _pick(rng, spec.textures, spec.texture_weights)
    for _ in range(40):
        r = spec.sizes[d_size] * float(rng.uniform(0.95, 1.05))
        x, y = rng.uniform(r + 0.02, 1 - r - 0.02, 2)
        if all(math.hypot(x - o.x, y - o.y) > r + o.radius + 0.04 for o in objects):
            return SceneObject(d_shape, d_color, d_size, d_texture, float(x), float(y), r)
        d_size = min(spec.sizes, key=spec.sizes.__getitem__)  # no room at that size: try the smallest
    return None


# ----------------------------------------------------------------------------------------- drawing


@functools.cache
def shape_polygon(shape: str) -> np.ndarray:
    """Outline (N, 2) of a shape of radius ~1 (within 1.02), y pointing down."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    if shape == "circle":
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.72
    elif shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        pts = np.stack([np.cos(a), np.sin(a) + 0.12], 1)
    elif shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(a), rad * np.sin(a) + 0.05], 1)
    elif shape == "cross":
        w, e = 0.3, 0.85
        pts = np.array(
            [
                [-w, -e],
                [w, -e],
                [w, -w],
                [e, -w],
                [e, w],
                [w, w],
                [w, e],
                [-w, e],
                [-w, w],
                [-e, w],
                [-e, -w],
                [-w, -w],
            ]
        )
    elif shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) / 17.5
    elif shape == "diamond":
        pts = np.array([[0, -1], [0.68, 0], [0, 1], [-0.68, 0]])
    elif shape == "hexagon":
        a = np.deg2rad(60 * np.arange(6))
        pts = np.stack([np.cos(a), np.sin(a)], 1) * 0.95
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {list(SPEC.shapes)}")
    pts = np.asarray(pts, dtype=np.float64)
    pts.flags.writeable = False  # cached and shared
    return pts


@functools.cache
def _texture_mask(texture: str, image_size: int) -> np.ndarray:
    """Supersampled 0/1 pattern over the whole canvas: diagonal stripes or a grid of dots."""
    n = image_size * SUPERSAMPLE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    if texture == "striped":
        period = max(3.0, 0.11 * image_size) * SUPERSAMPLE
        mask = ((xx + yy) % period) < period / 2
    elif texture == "dotted":
        period = max(4.0, 0.14 * image_size) * SUPERSAMPLE
        dx, dy = xx % period - period / 2, yy % period - period / 2
        mask = dx * dx + dy * dy < (0.27 * period) ** 2
    else:
        raise ValueError(f"unknown texture {texture!r}")
    mask = mask.astype(np.uint8)
    mask.flags.writeable = False  # cached and shared
    return mask


def _background(name: str, image_size: int, rng: np.random.Generator, spec: ShapesWorldSpec) -> np.ndarray:
    level = spec.backgrounds[name]
    if level is not None:
        value = level + float(rng.uniform(-0.03, 0.03))
        return np.full((image_size, image_size, 3), value, dtype=np.float32)
    if name == "noise":
        gray = rng.uniform(0.3, 0.7) + rng.normal(0.0, 0.12, (image_size, image_size))
    else:  # gradient between two gray levels along a random direction
        a, b = rng.uniform(0.1, 0.9, 2)
        if abs(a - b) < 0.3:
            b = a + 0.4 if a < 0.5 else a - 0.4
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1) - 0.5
        t = np.clip(0.5 + xx * np.cos(angle) + yy * np.sin(angle), 0, 1)
        gray = a + (b - a) * t
    gray = np.clip(gray, 0, 1).astype(np.float32)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _coverage(obj: SceneObject, image_size: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]]:
    """Fraction of each output pixel covered by the object (and by its texture pattern), in its box."""
    s = SUPERSAMPLE
    r_px = obj.radius * image_size
    cx, cy = obj.x * image_size, obj.y * image_size
    x0, x1 = max(0, math.floor(cx - r_px) - 1), min(image_size, math.ceil(cx + r_px) + 1)
    y0, y1 = max(0, math.floor(cy - r_px) - 1), min(image_size, math.ceil(cy + r_px) + 1)
    w, h = (x1 - x0) * s, (y1 - y0) * s
    pts = shape_polygon(obj.shape) * (r_px * s) + ((cx - x0) * s, (cy - y0) * s)
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(pts.ravel().tolist(), fill=1)
    mask = np.frombuffer(canvas.tobytes(), dtype=np.uint8).reshape(h, w)
    cov = _box_mean(mask, s)
    pattern = None
    if obj.texture != "solid":
        pattern = _box_mean(
            mask & _texture_mask(obj.texture, image_size)[y0 * s : y1 * s, x0 * s : x1 * s], s
        )
    return cov, pattern, (y0, y1, x0, x1)


def _box_mean(mask: np.ndarray, s: int) -> np.ndarray:
    """Mean of each s x s block of a 0/1 mask: the covered fraction of each output pixel."""
    h, w = mask.shape
    return mask.reshape(h // s, s, w // s, s).sum(axis=(1, 3), dtype=np.float32) * np.float32(1 / (s * s))


def render_array(
    scene: Scene, image_size: int = 32, rng: np.random.Generator | None = None, spec: ShapesWorldSpec = SPEC
) -> np.ndarray:
    """Draw ``scene`` as uint8 (H, W, 3); ``rng`` drives background noise and colour jitter only."""
    rng = rng if rng is not None else np.random.Generator(np.random.PCG64(0))
    canvas = _background(scene.background, image_size, rng, spec)
    light = float(canvas.mean()) > 0.45
    for obj in scene.objects:
        jitter = rng.integers(-10, 11, 3).astype(np.float32)
        rgb = (np.asarray(spec.colors[obj.color], dtype=np.float32) + jitter) * np.float32(1 / 255)
        cov, pattern, (y0, y1, x0, x1) = _coverage(obj, image_size)
        region = canvas[y0:y1, x0:x1]  # a view: composited in place, "over" with coverage as alpha
        region *= 1.0 - cov[:, :, None]
        region += cov[:, :, None] * rgb
        if pattern is not None:
            # the texture's second tone: a shade (light backgrounds) or tint (dark ones) of the same hue
            second = rgb * 0.35 if light else rgb * 0.35 + 0.65
            region += pattern[:, :, None] * (second - rgb)
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render(
    scene: Scene | Mapping[str, Any],
    image_size: int = 32,
    rng: np.random.Generator | None = None,
    spec: ShapesWorldSpec = SPEC,
) -> Image.Image:
    """Draw a scene as an RGB PIL image of ``image_size`` pixels a side.

    ``scene`` is a :class:`Scene`, or attributes such as ``{"shape": "star", "color": "red"}`` for which
    the rest (layout included) is drawn from ``rng`` with :func:`sample_scene`.
    """
    rng = rng if rng is not None else np.random.Generator(np.random.PCG64(0))
    if not isinstance(scene, Scene):
        scene = sample_scene(rng, spec, **scene)
    return Image.fromarray(render_array(scene, image_size, rng, spec))


# ----------------------------------------------------------------------------------------- captions


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
    return _pick(rng, words)


def _background_phrase(background: str, rng: np.random.Generator) -> str:
    if background == "noise":
        return _pick(rng, ("a noisy background", "a grainy background"))
    if background == "gradient":
        return _pick(rng, ("a gradient background", "a shaded background"))
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
    lead = _pick(rng, ("a picture of", "a photo of", "an image of"))
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
    lead = _pick(rng, ("a simple drawing of", "a sketch of", "a cartoon of"))
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
    return _sentence(_pick(rng, CAPTION_TEMPLATES)(scene, rng))


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


# ----------------------------------------------------------------------------------------- generate / CLI


def generate(
    out: str | Path,
    *,
    seed: int = 0,
    size: int = 20000,
    image_size: int = 32,
    eval_size: int = 300,
    instruct_size: int | None = None,
    shard_size: int = 5000,
) -> dict[str, Any]:
    """Write the whole world under ``out`` and return the summary (also written as summary.json).

    ``size`` pre-training pairs; ``eval_size`` held-out images (COCO/VQA/POPE) and zero-shot test images
    per task; ``instruct_size`` LLaVA training images (default ``max(eval_size, size // 10)``).
    """
    from dvd.data import shapesworld_formats as formats

    return formats.write_world(
        Path(out),
        seed=seed,
        size=size,
        image_size=image_size,
        eval_size=eval_size,
        instruct_size=instruct_size,
        shard_size=shard_size,
    )


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cli(argv: list[str]) -> int:
    """``dvd data shapesworld --out DIR [--seed S] [--size N] [--image-size PX] [--eval-size M]``."""
    parser = argparse.ArgumentParser(prog="dvd data shapesworld", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory: new, empty or an earlier ShapesWorld")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=20000, help="pre-training image-text pairs")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (>= 16)")
    parser.add_argument("--eval-size", type=int, default=300, help="held-out and per-task test images")
    parser.add_argument("--instruct-size", type=int, default=None, help="LLaVA training images")
    parser.add_argument("--shard-size", type=int, default=5000, help="pairs per pre-training shard")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = generate(
        args.out,
        seed=args.seed,
        size=args.size,
        image_size=args.image_size,
        eval_size=args.eval_size,
        instruct_size=args.instruct_size,
        shard_size=args.shard_size,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    pre = summary["pretrain"]
    print(
        f"ShapesWorld (seed {summary['seed']}, {summary['image_size']} px) written to {out} "
        f"in {seconds:.1f} s, {_human_bytes(total)} on disk"
    )
    print(f"  pretrain   {pre['samples']} pairs in {len(pre['shards'])} shard(s): {out / pre['urls']}")
    for task, info in summary["zeroshot"].items():
        print(f"  zeroshot   {task:<8} {info['samples']} images, {len(info['classnames'])} classes")
    images = summary["images"]
    print(f"  images     {images['train']} train (LLaVA), {images['test']} held-out test: {out / 'images'}")
    for name in (
        "captions/annotations.json",
        "vqa/questions.json",
        "pope/pope_random.jsonl",
        "pope/pope_popular.jsonl",
        "pope/pope_adversarial.jsonl",
        "llava/stage1_captions.json",
        "llava/stage2_instruct.json",
    ):
        info = summary["files"][name]
        print(f"  {name:<29} {info['records']:>6} records  {_human_bytes(info['bytes'])}")
    return 0


def check_arguments(
    out: Path,
    *,
    seed: int,
    size: int,
    image_size: int,
    eval_size: int,
    instruct_size: int | None,
    shard_size: int,
) -> None:
    """One-line errors for arguments that cannot make a world."""
    if seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    if size < 1:
        raise ConfigError(f"--size must be >= 1 pre-training pairs, got {size}")
    if image_size < 16:
        raise ConfigError(f"--image-size must be >= 16 pixels, got {image_size}")
    if eval_size < 2:
        raise ConfigError(f"--eval-size must be >= 2 held-out images, got {eval_size}")
    if instruct_size is not None and instruct_size < 1:
        raise ConfigError(f"--instruct-size must be >= 1 images, got {instruct_size}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1 pairs per shard, got {shard_size}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory path")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out {out}: {parent} is a file, not a directory; give another path")
    if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise ConfigError(f"--out {out} holds other files (no ShapesWorld summary.json); use a new directory")
