"""ShapesWorld scenes: the world's specification, scene sampling and drawing.

Every image holds one *main group* -- ``count`` copies (1-4) of one shape in one colour, size and
texture -- on a neutral background (plain white/black/gray, gray noise or a gray gradient), and a
fraction of images add one *distractor* object of a different shape and a different colour. Object
colours are saturated and backgrounds neutral, so "the colour of the image" is always the main
group's (or, with a distractor, one of two named colours). Shapes follow a skewed prior and the
distractor prefers each shape's "companions": this gives POPE's popular and adversarial negatives
something real to measure. All randomness comes from ``numpy.random.Generator(PCG64([seed, stream,
index]))``.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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
    # period of the stripes and of the dot grid, as fractions of the image side (at least 3 and 4 px)
    texture_periods: dict[str, float] = field(default_factory=lambda: {"striped": 0.11, "dotted": 0.14})
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
    # share of pre-training captions that name every attribute but the colour (0: the templates only, the
    # world of earlier releases): the contrastive loss is satisfied by colour unless some captions omit it
    # (benchmarks/shapesworld_learnability.md)
    hard_caption_prob: float = 0.0
    # how likely a hard caption names each attribute (count, size, color, texture, shape; a missing shape is
    # 1): below 1, some hard captions name the shape (or, with shape < 1, e.g. the texture) with few others,
    # so that matching them needs it
    hard_caption_keep: dict[str, float] = field(
        default_factory=lambda: {"count": 1.0, "size": 1.0, "texture": 1.0, "shape": 1.0}
    )

    def to_json(self) -> dict[str, Any]:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        if not self.hard_caption_prob:  # no hard captions: the summary of earlier releases, byte for byte
            del out["hard_caption_keep"]
        if self.texture_periods == TEXTURE_PERIODS:  # likewise
            del out["texture_periods"]
        return out


SPEC = ShapesWorldSpec()
TEXTURE_PERIODS = SPEC.texture_periods


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


def pick(rng: np.random.Generator, items: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
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
    shape = fixed.get("shape") or pick(rng, spec.shapes, spec.shape_weights)
    color = fixed.get("color") or pick(rng, list(spec.colors))
    size = fixed.get("size") or pick(rng, list(spec.sizes))
    texture = fixed.get("texture") or pick(rng, spec.textures, spec.texture_weights)
    count = int(fixed.get("count") or (1 if fixed.get("position") else pick(rng, spec.counts)))
    background = fixed.get("background") or pick(rng, list(spec.backgrounds), spec.background_weights)
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
        position = fixed.get("position") or pick(rng, list(spec.positions))
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
    d_shape = pick(rng, companions) if companions and rng.random() < 0.6 else pick(rng, others)
    d_color = pick(rng, [c for c in spec.colors if c != color])
    d_size = pick(rng, list(spec.sizes))
    d_texture = pick(rng, spec.textures, spec.texture_weights)
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
def _texture_mask(texture: str, image_size: int, period: float) -> np.ndarray:
    """Supersampled 0/1 pattern over the whole canvas: diagonal stripes or a grid of dots, ``period`` a
    fraction of the side."""
    n = image_size * SUPERSAMPLE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    if texture == "striped":
        step = max(3.0, period * image_size) * SUPERSAMPLE  # supersampled pixels
        mask = ((xx + yy) % step) < step / 2
    elif texture == "dotted":
        step = max(4.0, period * image_size) * SUPERSAMPLE
        dx, dy = xx % step - step / 2, yy % step - step / 2
        mask = dx * dx + dy * dy < (0.27 * step) ** 2
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


def _coverage(
    obj: SceneObject, image_size: int, spec: ShapesWorldSpec
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]]:
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
        texture = _texture_mask(obj.texture, image_size, spec.texture_periods[obj.texture])
        pattern = _box_mean(mask & texture[y0 * s : y1 * s, x0 * s : x1 * s], s)
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
        cov, pattern, (y0, y1, x0, x1) = _coverage(obj, image_size, spec)
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
