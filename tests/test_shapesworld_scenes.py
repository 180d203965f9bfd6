"""ShapesWorld scenes, drawing and captions: labels stay well-defined."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dvd.data.shapesworld_captions import caption, captions, hard_caption, plural, pretrain_caption
from dvd.data.shapesworld_formats import png_bytes
from dvd.data.shapesworld_scenes import (
    NUMBER_WORDS,
    SPEC,
    Scene,
    render,
    render_array,
    sample_scene,
    scene_rng,
)

seeds = st.integers(min_value=0, max_value=2**32 - 1)


@settings(max_examples=60, deadline=None)
@given(seed=seeds)
def test_objects_never_overlap_and_stay_inside_the_image(seed: int) -> None:
    scene = sample_scene(scene_rng(seed, 0, 0))
    assert len(scene.objects) == scene.count + (scene.distractor is not None)
    for obj in scene.objects:
        assert obj.radius <= obj.x <= 1 - obj.radius and obj.radius <= obj.y <= 1 - obj.radius
    for a, b in itertools.combinations(scene.objects, 2):
        assert math.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius


@settings(max_examples=60, deadline=None)
@given(seed=seeds)
def test_main_group_is_one_shape_colour_size_and_texture_and_the_distractor_differs(seed: int) -> None:
    scene = sample_scene(scene_rng(seed, 0, 0))
    group = scene.objects[: scene.count]
    assert {(o.shape, o.color, o.size, o.texture) for o in group} == {
        (scene.shape, scene.color, scene.size, scene.texture)
    }
    assert (scene.position is not None) == (scene.count == 1)
    if scene.distractor is not None:
        assert scene.distractor.shape != scene.shape and scene.distractor.color != scene.color


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@settings(max_examples=60, deadline=None)
@given(seed=seeds)
def test_captions_name_the_main_shape_and_only_what_is_in_the_image(seed: int) -> None:
    rng = scene_rng(seed, 0, 0)
    scene = sample_scene(rng)
    refs = captions(scene, rng, 5)
    assert len(refs) == 5 and len(set(refs)) == 5
    present_colors = {scene.color} | ({scene.distractor.color} if scene.distractor else set())
    present_shapes = set(scene.present_shapes)
    for text in [*refs, caption(scene, rng)]:
        words = _words(text)
        assert {scene.shape, plural(scene.shape)} & words, text
        assert {c for c in SPEC.colors if c in words} <= present_colors, text
        assert {s for s in SPEC.shapes if s in words or plural(s) in words} <= present_shapes, text
        assert text[0].isupper() and text.endswith(".")


@settings(max_examples=60, deadline=None)
@given(seed=seeds)
def test_hard_pretrain_captions_name_all_but_the_colour(seed: int) -> None:
    rng = scene_rng(seed, 0, 0)
    scene = sample_scene(rng)
    text = pretrain_caption(scene, rng, dataclasses.replace(SPEC, hard_caption_prob=1.0))
    noun = [scene.shape] if scene.count == 1 else [scene.shape, "shapes"]  # singular, as zero-shot prompts
    number = {"a", "one"} if scene.count == 1 else {NUMBER_WORDS[scene.count]}
    first, *rest = text.lower().rstrip(".").split()
    assert first in number and rest == [scene.size, scene.texture, *noun], text  # no colour, no distractor


@settings(max_examples=30, deadline=None)
@given(seed=seeds)
def test_by_default_pretrain_captions_are_the_templates_drawn_from_the_same_generator(seed: int) -> None:
    rng, again = scene_rng(seed, 0, 0), scene_rng(seed, 0, 0)
    scene = sample_scene(rng)
    sample_scene(again)
    assert SPEC.hard_caption_prob == 0.0  # the world of earlier releases, byte for byte
    assert pretrain_caption(scene, rng) == caption(scene, again)


def test_hard_caption_prob_sets_the_share_of_captions_without_colour() -> None:
    spec = dataclasses.replace(SPEC, hard_caption_prob=0.65)
    hard = 0
    for i in range(400):
        rng = scene_rng(0, 0, i)
        scene = sample_scene(rng)
        words = _words(pretrain_caption(scene, rng, spec))
        hard += scene.size in words and scene.texture in words and not words & set(SPEC.colors)
    assert 0.55 * 400 <= hard <= 0.75 * 400


def test_fixed_attributes_are_respected_and_unknown_ones_refused() -> None:
    rng = scene_rng(0, 0, 0)
    scene = sample_scene(
        rng,
        shape="heart",
        color="cyan",
        count=3,
        size="small",
        texture="dotted",
        background="black",
        distractor=True,
    )
    assert (scene.shape, scene.color, scene.count, scene.size, scene.texture, scene.background) == (
        "heart",
        "cyan",
        3,
        "small",
        "dotted",
        "black",
    )
    assert scene.distractor is not None
    assert sample_scene(rng, position="top left").count == 1
    with pytest.raises(ValueError, match="colour"):
        sample_scene(rng, colour="red")
    with pytest.raises(ValueError, match="shape 'blob'"):
        sample_scene(rng, shape="blob")
    with pytest.raises(ValueError, match="only defined for count=1"):
        sample_scene(rng, position="top", count=2)


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_render_is_an_rgb_image_of_the_requested_size_and_deterministic(image_size: int) -> None:
    scene = sample_scene(scene_rng(3, 0, 0), background="noise")
    first = render(scene, image_size, scene_rng(3, 9, 0))
    second = render(scene, image_size, scene_rng(3, 9, 0))
    assert first.mode == "RGB" and first.size == (image_size, image_size)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert not np.array_equal(np.asarray(first), np.asarray(render(scene, image_size, scene_rng(4, 9, 0))))


def test_every_shape_colour_and_texture_draws_its_colour_where_the_object_is() -> None:
    for shape, color, texture in itertools.product(SPEC.shapes, SPEC.colors, SPEC.textures):
        scene = sample_scene(
            scene_rng(1, 0, 0),
            shape=shape,
            color=color,
            texture=texture,
            count=1,
            position="center",
            size="large",
            background="white",
            distractor=False,
        )
        pixel = render_array(scene, 32)[16, 16].astype(int)  # the centre of a large solid-ish object
        nearest = min(SPEC.colors, key=lambda c: _hue_distance(pixel, np.array(SPEC.colors[c])))
        assert nearest == color, (shape, color, texture, pixel)


def _hue_distance(pixel: np.ndarray, rgb: np.ndarray) -> float:
    """Distance between chromaticities, so that a texture's darker shade still matches its colour."""
    p, q = pixel / max(pixel.sum(), 1), rgb / rgb.sum()
    return float(np.abs(p - q).sum())


def test_render_takes_attributes_and_scenes_survive_a_json_round_trip() -> None:
    image = render({"shape": "star", "color": "red", "count": 2, "distractor": False}, 48, scene_rng(2, 0, 0))
    assert image.size == (48, 48)
    rng = scene_rng(6, 0, 0)
    scene = sample_scene(rng, distractor=True)
    again = Scene.from_json(json.loads(json.dumps(scene.to_json())))
    assert again == scene and again.distractor is not None


def test_png_bytes_decode_to_the_same_pixels() -> None:
    array = render_array(sample_scene(scene_rng(5, 0, 0)), 32, scene_rng(5, 0, 1))
    data = png_bytes(array)
    assert data == png_bytes(array)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), array)


def test_hard_captions_name_each_attribute_with_its_keep_probability_and_the_shape_always() -> None:
    texture_only = {"texture": 1.0, "shape": 1.0}
    spec = dataclasses.replace(SPEC, hard_caption_prob=1.0, hard_caption_keep=texture_only)
    for i in range(50):
        rng = scene_rng(0, 0, i)
        scene = sample_scene(rng)
        assert pretrain_caption(scene, rng, spec) == f"{scene.texture.capitalize()} {scene.shape} shapes."
    half = dataclasses.replace(spec, hard_caption_keep={"count": 0.5, "size": 0.5, "texture": 0.5})
    named = {"size": 0, "texture": 0, "shape only": 0}
    for i in range(400):
        rng = scene_rng(0, 0, i)
        scene = sample_scene(rng)
        words = _words(pretrain_caption(scene, rng, half))
        assert scene.shape in words and not words & set(SPEC.colors)
        named["size"] += scene.size in words
        named["texture"] += scene.texture in words
        named["shape only"] += words <= {scene.shape, "shapes"}
    assert 150 <= named["size"] <= 250 and 150 <= named["texture"] <= 250, named
    assert 25 <= named["shape only"] <= 75, named  # 1/8 of them: count, size and texture all left out
    bad = dataclasses.replace(spec, hard_caption_keep={"shape": 1.0, "colour": 1.0})
    with pytest.raises(ValueError, match="colour"):
        pretrain_caption(scene, scene_rng(0, 0, 0), bad)


def test_a_hard_caption_may_leave_the_shape_out_so_that_another_attribute_alone_matches_it() -> None:
    spec = dataclasses.replace(SPEC, hard_caption_prob=1.0, hard_caption_keep={"texture": 1.0, "shape": 0.0})
    for i in range(30):
        rng = scene_rng(0, 0, i)
        scene = sample_scene(rng)
        assert pretrain_caption(scene, rng, spec) == f"{scene.texture.capitalize()} shapes."
    one = dataclasses.replace(spec, hard_caption_keep={"count": 1.0, "shape": 0.0})
    single = next(s for s in (sample_scene(scene_rng(0, 0, i)) for i in range(100)) if s.count == 1)
    assert _words(hard_caption(single, scene_rng(0, 0, 0), one.hard_caption_keep)) <= {"a", "one", "shape"}
    half = dataclasses.replace(spec, hard_caption_keep={"texture": 1.0, "shape": 0.5})
    shapes = 0
    for i in range(400):
        rng = scene_rng(0, 0, i)
        scene = sample_scene(rng)
        words = _words(pretrain_caption(scene, rng, half))
        assert scene.texture in words
        shapes += scene.shape in words
    assert 150 <= shapes <= 250, shapes


def test_the_spec_summary_names_hard_caption_settings_only_when_hard_captions_are_on() -> None:
    assert "hard_caption_keep" not in SPEC.to_json()
    on = dataclasses.replace(SPEC, hard_caption_prob=0.5, hard_caption_keep={"texture": 0.5, "shape": 1.0})
    assert on.to_json()["hard_caption_keep"] == {"texture": 0.5, "shape": 1.0}
