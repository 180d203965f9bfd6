"""ShapesWorld spec overrides: a world drawn with other priors, radii or captions (``--spec FILE.yaml``).

An override file is a mapping of :class:`~dvd.data.shapesworld_scenes.ShapesWorldSpec` fields, e.g.::

  hard_caption_prob: 0.5
  hard_caption_keep: {texture: 1.0, shape: 0.0}
  sizes: {small: 0.14, large: 0.24}
  texture_periods: {striped: 0.2, dotted: 0.22}

Values, weights, probabilities, radii and colours' RGB may change; the category names (shapes, colours,
sizes, textures, counts, positions, backgrounds) may not: the zero-shot tasks and the question writers
name them. A mapping keyed by category names (``colors``, ``sizes``, ``positions``, ``backgrounds``,
``companions``, ``texture_periods``) may give some of the keys (the rest keep their defaults);
``hard_caption_keep`` replaces the default whole (an attribute it leaves out is named as
:func:`hard_caption` says).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dvd.config import ConfigError, suggest
from dvd.data.shapesworld_captions import HARD_CAPTION_NAMES
from dvd.data.shapesworld_scenes import SPEC, ShapesWorldSpec

CATEGORY_FIELDS = ("shapes", "textures", "counts")  # tuples of the world's category names
# keyed by category names
KEYED_FIELDS = ("colors", "sizes", "positions", "backgrounds", "companions", "texture_periods")
WEIGHT_FIELDS = ("shape_weights", "texture_weights", "background_weights")
PROBABILITY_FIELDS = ("distractor_prob", "hard_caption_prob")
MAX_RADIUS = 0.25  # a group of four large shapes sits on a 2 x 2 grid with slots 0.5 apart


def load_spec(path: str | Path) -> ShapesWorldSpec:
    """The spec of an override file (YAML mapping; empty: the default world)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--spec {path}: no such file; give a YAML mapping of ShapesWorldSpec fields")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        problem = str(error).replace("\n", " ")
        raise ConfigError(f"--spec {path} is not valid YAML ({problem})") from None
    return spec_from_mapping(values if values is not None else {}, str(path))


def spec_from_mapping(values: Mapping[str, Any], source: str) -> ShapesWorldSpec:
    """:data:`SPEC` with ``values`` (field name -> value) applied; bad keys or values are one-line errors
    naming ``source`` (where the values come from)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source} must be a mapping of ShapesWorldSpec fields, got {values!r}")
    known = [f.name for f in dataclasses.fields(ShapesWorldSpec)]
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown ShapesWorld spec key {key!r} in {source}{suggest(str(key), known)}")
        changes[key] = _field(key, value, getattr(SPEC, key), source)
    spec = dataclasses.replace(SPEC, **changes)
    _check_ranges(spec, source)
    return spec


def _field(name: str, value: Any, default: Any, source: str) -> Any:
    if name == "hard_caption_keep":
        keep = _mapping(name, value, source)
        for key in keep:
            if key not in HARD_CAPTION_NAMES:
                raise ConfigError(
                    f"{name}: unknown attribute {key!r} in {source}{suggest(str(key), HARD_CAPTION_NAMES)}"
                )
        return {key: _like(f"{name}.{key}", v, 1.0, source) for key, v in keep.items()}
    if name in KEYED_FIELDS:
        given = _mapping(name, value, source)
        for key in given:
            if key not in default:
                names = ", ".join(map(str, default))
                raise ConfigError(
                    f"{name}: {key!r} in {source} is not one of the world's {name} ({names}); category names "
                    "are fixed (the zero-shot tasks and questions name them), change values only"
                )
        return {key: _like(f"{name}.{key}", given.get(key, v), v, source) for key, v in default.items()}
    if name in CATEGORY_FIELDS and isinstance(value, (list, tuple)) and list(value) != list(default):
        raise ConfigError(
            f"{name} in {source}: category names are fixed (the zero-shot tasks and questions name them), "
            f"got {list(value)}, the world's are {list(default)}; change weights, colours, radii"
        )
    return _like(name, value, default, source)


def _mapping(name: str, value: Any, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} in {source} must be a mapping, got {value!r}")
    return value


def _like(name: str, value: Any, default: Any, source: str) -> Any:
    """``value`` as the type of ``default`` (YAML lists as tuples of the same length)."""
    if default is None:
        if value is not None:
            raise ConfigError(f"{name} in {source} is drawn, not a level: it must stay null, got {value!r}")
        return None
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f"{name} in {source} must be a list of {len(default)} values, got {value!r}")
        pairs = enumerate(zip(value, default, strict=True))
        return tuple(_like(f"{name}[{i}]", v, d, source) for i, (v, d) in pairs)
    kind = type(default)
    if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
        word = {str: "a string", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"{name} in {source} must be {word}, got {value!r}")
    return kind(value)


def _check_ranges(spec: ShapesWorldSpec, source: str) -> None:
    def fail(problem: str) -> None:
        raise ConfigError(f"{problem} in {source}")

    for name in WEIGHT_FIELDS:
        weights = getattr(spec, name)
        if min(weights) < 0 or sum(weights) <= 0:
            fail(f"{name} must be >= 0 with a positive sum, got {list(weights)}")
    probabilities = {name: getattr(spec, name) for name in PROBABILITY_FIELDS}
    probabilities.update({f"hard_caption_keep.{k}": v for k, v in spec.hard_caption_keep.items()})
    for name, p in probabilities.items():
        if not 0.0 <= p <= 1.0:
            fail(f"{name} must be a probability in [0, 1], got {p}")
    for size, radius in spec.sizes.items():
        if not 0.0 < radius <= MAX_RADIUS:
            fail(f"sizes.{size} must be a radius in (0, {MAX_RADIUS}] of the image side, got {radius}")
    for texture, period in spec.texture_periods.items():
        if not 0.0 < period <= 1.0:
            fail(f"texture_periods.{texture} must be a period in (0, 1] of the image side, got {period}")
    for color, rgb in spec.colors.items():
        if not all(0 <= c <= 255 for c in rgb):
            fail(f"colors.{color} must be RGB values in [0, 255], got {list(rgb)}")
    for position, xy in spec.positions.items():
        if not all(0.0 <= c <= 1.0 for c in xy):
            fail(f"positions.{position} must be (x, y) fractions of the side in [0, 1], got {list(xy)}")
    for background, level in spec.backgrounds.items():
        if level is not None and not 0.0 <= level <= 1.0:
            fail(f"backgrounds.{background} must be a gray level in [0, 1], got {level}")
    for shape, companions in spec.companions.items():
        for companion in companions:
            if companion not in spec.shapes or companion == shape:
                fail(f"companions.{shape} must name other shapes of the world, got {list(companions)}")
