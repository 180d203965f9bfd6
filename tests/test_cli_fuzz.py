"""Fuzzing the command line: whatever a user types, the answer is one clear line, never a traceback."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvd.cli import main

VALUES = st.one_of(
    st.sampled_from(["4/255", "0", "-1", "300", "1e9", "nan", "abc", "", "4", "1/0", "2,3", "apgd_ce", "aa"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8),
)
ZEROSHOT_FLAGS = ["--eps", "--eps-unit", "--attack", "--steps", "--batch-size", "--limit", "--workers"]
TRAIN_KEYS = ["recipe", "steps", "eps", "attack_steps", "batch_size", "lr", "stepz", "phases", "precision"]


def _assert_clean_failure(code: int | None, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith(("dvd: error:", "dvd eval zeroshot: error:", "dvd train clip: error:")), err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(ZEROSHOT_FLAGS), VALUES), max_size=4))
def test_eval_zeroshot_arguments_fail_with_one_clear_line(capsys, tmp_path_factory, options):
    argv = ["eval", "zeroshot", "--model", "no-such-model-xyz", "--dataset", "/nonexistent/dataset"]
    for flag, value in options:
        argv += [f"{flag}={value}"]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    _assert_clean_failure(code, capsys.readouterr().err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(TRAIN_KEYS), VALUES), max_size=4))
def test_train_clip_overrides_fail_with_one_clear_line(capsys, options):
    argv = ["train", "clip", "data=/nonexistent/shards-{000..001}.tar", "output_dir=/nonexistent/out"]
    argv += [f"{key}={value}" for key, value in options]
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    _assert_clean_failure(code, capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "zeroshot", "--model", "x", "--dataset", "d", "--eps", "4"], "--eps-unit 255"),
        (["eval", "zeroshot", "--model", "x", "--dataset", "d", "--steps", "0"], "--steps must be >= 1"),
        (["eval", "zeroshot", "--model", "x", "--dataset", "d", "--attack", "apgd_ce"], "did you mean"),
        (["train", "clip", "recipe=delt"], "did you mean"),
    ],
)
def test_common_mistakes_name_the_fix(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
