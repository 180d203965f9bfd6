"""ShapesWorld spec overrides (``dvd data shapesworld --spec FILE.yaml``): they reach every file, the
default world stays byte for byte, and bad overrides are one-line errors."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dvd.cli import main
from dvd.config import ConfigError
from dvd.data.shapesworld import generate
from dvd.data.shapesworld_scenes import SPEC, ShapesWorldSpec, render_array, sample_scene
from dvd.data.shapesworld_spec import load_spec, spec_from_mapping

DEFAULT_SPEC = json.loads(json.dumps(SPEC.to_json()))  # as summary.json holds it
TINY = ["--size", "40", "--eval-size", "6", "--instruct-size", "4", "--shard-size", "20"]


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _shard_members(root: Path, ext: str) -> list[bytes]:
    out = []
    for shard in sorted((root / "pretrain").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(f".{ext}"):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    out.append(handle.read())
    return out


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file()}


def test_hard_caption_overrides_make_every_pretraining_caption_name_the_texture_alone(tmp_path: Path) -> None:
    spec = _write(tmp_path, "hard_caption_prob: 1.0\nhard_caption_keep: {texture: 1.0, shape: 0.0}\n")
    assert main(["data", "shapesworld", "--out", str(tmp_path / "w"), *TINY, "--spec", str(spec)]) == 0
    captions = [c.decode() for c in _shard_members(tmp_path / "w", "txt")]
    textures = [json.loads(m)["texture"] for m in _shard_members(tmp_path / "w", "json")]
    assert len(captions) == 40 and len(set(textures)) > 1
    assert captions == [f"{t.capitalize()} shapes." for t in textures]
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["spec"]["hard_caption_prob"] == 1.0
    assert summary["spec"]["hard_caption_keep"] == {"texture": 1.0, "shape": 0.0}


def test_larger_radii_reach_the_scenes_the_images_and_the_summary(tmp_path: Path) -> None:
    generate(tmp_path / "default", seed=3, size=20, eval_size=6, instruct_size=4)
    spec = spec_from_mapping({"sizes": {"small": 0.14, "large": 0.24}}, "test")
    generate(tmp_path / "large", seed=3, size=20, eval_size=6, instruct_size=4, spec=spec)
    summary = json.loads((tmp_path / "large" / "summary.json").read_text())
    assert summary["spec"]["sizes"] == {"small": 0.14, "large": 0.24}
    for meta in map(json.loads, _shard_members(tmp_path / "large", "json")):
        radius = {"small": 0.14, "large": 0.24}[meta["size"]]
        assert radius * 0.95 <= meta["objects"][0]["radius"] <= radius * 1.05
    default, large = _digest(tmp_path / "default"), _digest(tmp_path / "large")
    for name in ("pretrain/shard-000000.tar", "zeroshot/size/test/0.tar", "images/test/000000000001.png"):
        assert default[name] != large[name]
    # the category names stay: the same class lists, the same questions' vocabulary
    assert summary["zeroshot"]["size"]["classnames"] == ["small", "large"]


def test_coarser_texture_periods_redraw_the_textured_objects_only() -> None:
    coarse = spec_from_mapping({"texture_periods": {"striped": 0.25, "dotted": 0.25}}, "test")
    assert coarse.texture_periods == {"striped": 0.25, "dotted": 0.25}
    assert coarse.to_json()["texture_periods"] == {"striped": 0.25, "dotted": 0.25}
    assert "texture_periods" not in SPEC.to_json()  # the summary of earlier worlds, byte for byte

    def stripe_edges(image: np.ndarray) -> int:  # tone changes along the image's rows
        gray = image.astype(int).sum(axis=2)
        return int((np.abs(np.diff(gray, axis=1)) > 60).sum())

    def draw(texture: str, spec: ShapesWorldSpec) -> np.ndarray:
        scene = sample_scene(np.random.default_rng(5), texture=texture, size="large", count=1,
                             background="white", distractor=False)
        return render_array(scene, 128, np.random.default_rng(1), spec)

    assert np.array_equal(draw("solid", SPEC), draw("solid", coarse))
    outline = stripe_edges(draw("solid", SPEC))  # the same object, so the same outline in every texture
    for texture in ("striped", "dotted"):  # a coarser pattern: fewer tone changes inside the same object
        fine, wide = (stripe_edges(draw(texture, spec)) - outline for spec in (SPEC, coarse))
        assert 0 < wide < 0.75 * fine


def test_an_empty_spec_file_writes_the_default_world_byte_for_byte(tmp_path: Path) -> None:
    spec = _write(tmp_path, "# no overrides\n")
    assert main(["data", "shapesworld", "--out", str(tmp_path / "a"), *TINY, "--spec", str(spec)]) == 0
    assert main(["data", "shapesworld", "--out", str(tmp_path / "b"), *TINY]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["spec"] == DEFAULT_SPEC


def test_writing_again_with_another_spec_replaces_the_world_like_any_other_setting(tmp_path: Path) -> None:
    out = tmp_path / "w"
    spec = _write(tmp_path, "distractor_prob: 0.0\n")
    assert main(["data", "shapesworld", "--out", str(out), *TINY, "--spec", str(spec)]) == 0
    assert not any(json.loads(m)["distractor"] for m in _shard_members(out, "json"))
    assert main(["data", "shapesworld", "--out", str(out), *TINY]) == 0
    assert json.loads((out / "summary.json").read_text())["spec"] == DEFAULT_SPEC
    assert any(json.loads(m)["distractor"] for m in _shard_members(out, "json"))


def test_yaml_lists_become_tuples_and_keyed_overrides_keep_the_other_keys_and_their_order() -> None:
    spec = spec_from_mapping({"texture_weights": [1, 1, 1], "sizes": {"large": 0.2}}, "test")
    assert spec.texture_weights == (1.0, 1.0, 1.0)
    assert list(spec.sizes.items()) == [("small", 0.095), ("large", 0.2)]
    assert spec_from_mapping({}, "test") == SPEC


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hard_caption_prop: 0.5\n", r"unknown ShapesWorld spec key 'hard_caption_prop' in .*spec.yaml "
                                     r"\(did you mean 'hard_caption_prob'"),
        ("shapes: [circle, square]\n", r"shapes in .*spec.yaml: category names are fixed"),
        ("colors: {magenta: [255, 0, 255]}\n", r"colors: .magenta. in .*spec.yaml is not one of the world"),
        ("sizes: {tiny: 0.05}\n", r"sizes: 'tiny' .* category names are fixed"),
        ("- a\n- b\n", r"spec.yaml must be a mapping of ShapesWorldSpec fields, got \['a', 'b'\]"),
        ("hard_caption_prob: high\n", r"hard_caption_prob in .*spec.yaml must be a number, got 'high'"),
        ("hard_caption_prob: 1.5\n", r"hard_caption_prob must be a probability in \[0, 1\], got 1.5"),
        ("hard_caption_keep: {colour: 1.0}\n", r"hard_caption_keep: unknown attribute 'colour' .*'color'"),
        ("shape_weights: [1, 2]\n", r"shape_weights in .*spec.yaml must be a list of 8 values"),
        ("sizes: {large: 0.4}\n", r"sizes.large must be a radius in \(0, 0.25\]"),
        ("texture_periods: {striped: 0}\n", r"texture_periods.striped must be a period in \(0, 1\]"),
        ("texture_periods: {solid: 0.2}\n", r"texture_periods: 'solid' .* category names are fixed"),
        ("backgrounds: {noise: 0.5}\n", r"backgrounds.noise in .*spec.yaml is drawn, not a level"),
        ("companions: {circle: [circle, star]}\n", r"companions.circle must name other shapes"),
        ("sizes: [1, 2\n", r"--spec .*spec.yaml is not valid YAML"),
    ],
)
def test_a_bad_override_file_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    spec = _write(tmp_path, text)
    assert main(["data", "shapesworld", "--out", str(tmp_path / "w"), *TINY, "--spec", str(spec)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("dvd: error: ") and error.count("\n") == 1
    with pytest.raises(ConfigError, match=message):
        load_spec(spec)
    assert not (tmp_path / "w").exists()


def test_a_missing_spec_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "shapesworld", "--out", str(tmp_path / "w"), *TINY, "--spec", str(tmp_path / "nope.yaml")]
    assert main(argv) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
