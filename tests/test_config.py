"""Budgets, step counts and config overrides: misuse is a clear one-line error, never a silent number."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dvd.config import ConfigError, load_config, parse_eps, parse_eps_list, positive_int, suggest


def test_eps_fraction_and_decimal_mean_the_same_budget():
    assert parse_eps("4/255") == pytest.approx(4 / 255)
    assert parse_eps("0.0157") == pytest.approx(0.0157)
    assert parse_eps("4", unit=255) == pytest.approx(4 / 255)
    assert parse_eps("1.5/255") == 1.5 / 255 and parse_eps("4/255") == 4 / 255  # a decimal numerator too


def test_eps_above_one_without_unit_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="--eps-unit 255"):
        parse_eps("4")


@pytest.mark.parametrize("text", ["abc", "1/0", "-0.1", "nan", "", "1/2/3", "nan/255", "1/-255", "/255"])
def test_eps_garbage_is_a_config_error(text):
    with pytest.raises(ConfigError):
        parse_eps(text)


@given(st.text(max_size=12))
def test_eps_parser_only_ever_returns_a_budget_or_raises_config_error(text):
    try:
        eps = parse_eps(text)
    except ConfigError as error:
        assert "\n" not in str(error)
    else:
        assert 0 <= eps <= 1


@given(st.integers(min_value=0, max_value=255))
def test_eps_with_unit_is_value_over_unit(value):
    assert parse_eps(str(value), unit=255) == pytest.approx(value / 255)


def test_eps_list_parses_commas():
    assert parse_eps_list("1/255,2/255") == pytest.approx([1 / 255, 2 / 255])
    with pytest.raises(ConfigError):
        parse_eps_list("")


@pytest.mark.parametrize("value", [0, -3, "x", "1.5"])
def test_steps_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match="steps"):
        positive_int(value, "steps")


def test_suggest_names_the_closest_choice():
    assert "apgd-ce" in suggest("apgd_ce", ["apgd-ce", "apgd-t", "square"])


@dataclasses.dataclass
class _Recipe:
    lr: float = 1e-3
    steps: int = 10
    name: str = "clean"
    resume: str | None = None
    eps: list[float] = dataclasses.field(default_factory=lambda: [4 / 255])
    amp: bool = False


@dataclasses.dataclass
class _Typed:
    """A field of every kind a command config uses."""

    seed: int = 0
    steps: int = 10
    lr: float = 1e-3
    name: str = "clean"
    resume: str | None = None
    resume_or_none: str | None = "latest"
    eps_list: list[str] = dataclasses.field(default_factory=list)
    flag: bool = False
    options: dict[str, int] = dataclasses.field(default_factory=dict)


def test_config_from_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 0.01\nsteps: 5\n")
    cfg = load_config(_Recipe, path, ["steps=7", "amp=true", "eps=1/255,2/255", "resume=none"])
    assert cfg.lr == 0.01 and cfg.steps == 7 and cfg.amp is True and cfg.resume is None
    assert cfg.eps == pytest.approx([1 / 255, 2 / 255])


def test_yaml_values_read_as_strings_get_the_fields_type(tmp_path: Path):
    # YAML 1.1 reads 5e-6 (no dot) and 4/255 as strings; a str lr would only fail deep inside training
    path = tmp_path / "r.yaml"
    path.write_text("lr: 5e-6\nsteps: '12'\neps: 4/255\nname: 1e-3\namp: 'on'\n")
    cfg = load_config(_Recipe, path)
    assert cfg.lr == 5e-6 and cfg.steps == 12 and cfg.eps == pytest.approx([4 / 255]) and cfg.amp is True
    assert cfg.name == "1e-3"  # a str field keeps the text
    path.write_text("steps: lots\n")
    with pytest.raises(ConfigError, match="steps='lots': expected an int"):
        load_config(_Recipe, path)


def test_unknown_config_key_suggests_the_close_one(tmp_path: Path):
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(_Recipe, None, ["stepz=3"])
    path = tmp_path / "r.yaml"
    path.write_text("lrr: 1\n")
    with pytest.raises(ConfigError, match="'lr'"):
        load_config(_Recipe, path)


def test_missing_or_malformed_config_file_is_one_line(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(_Recipe, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_Recipe, bad)


@given(st.lists(st.text(max_size=10), max_size=3))
def test_override_parsing_gives_a_config_or_a_one_line_config_error(items):
    try:
        cfg = load_config(_Recipe, None, items)
    except ConfigError as error:  # any other exception fails the test
        assert str(error) and "\n" not in str(error)
    else:
        assert isinstance(cfg, _Recipe)


def test_override_with_control_characters_is_a_config_error():
    with pytest.raises(ConfigError, match="not a valid value"):
        load_config(_Recipe, None, ["eps=[\x1b]"])


def test_suggest_names_only_the_closest_few_of_a_long_list():
    names = [f"model-{i}" for i in range(200)] + ["ViT-B-32"]
    hint = suggest("nosuch", names)
    assert hint.startswith(" (closest of 201: ")
    assert hint.count(",") == 2  # three names, not two hundred


@pytest.mark.parametrize(
    ("yaml_line", "message"),
    [
        ("seed: 1.5", "seed=1.5: expected an int"),
        ("steps: null", "steps=None: expected an int"),
        ("lr: [1]", "lr=[1]: expected a number"),
        ("name: [a, b]", "name=['a', 'b']: expected a string"),
        ("eps_list: 5", "eps_list=5: expected a list"),
        ("flag: 3", "flag=3: expected true or false"),
        ("resume: [1]", "resume=[1]: expected a string"),
        ("options: 7", "options=7: expected a mapping"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_one_line_errors(tmp_path: Path, yaml_line: str, message: str):
    path = tmp_path / "r.yaml"
    path.write_text(yaml_line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(_Typed, path)
    assert str(caught.value) == message


def test_yaml_numbers_where_a_string_is_expected_read_as_an_override_would(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("name: 123\nresume: 5\nseed: 2.0\nlr: 1\nflag: true\nresume_or_none: null\n")
    assert load_config(_Typed, path) == load_config(
        _Typed, None, ["name=123", "resume=5", "seed=2", "lr=1", "flag=true", "resume_or_none=null"]
    )
