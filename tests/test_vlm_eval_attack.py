"""The VLM attack machinery: answer objective, eps ball, worst-case ensemble, scoring helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dvd.eval import vlm_attack as va
from dvd.eval import vlm_ensemble
from dvd.eval.captioning import CiderScorer, caption_scores, cider_per_image
from dvd.eval.targeted import canonical_target, target_outcome
from dvd.eval.vqa import ranked_answers
from tiny_models import IMAGE_SIZE, tiny_dvd_vlm


def saturated_images(n: int) -> torch.Tensor:
    """Random images with a band of exact 0s and 1s, so that the [0, 1] clipping is exercised."""
    x = torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    x[:, :, :4] = 0.0
    x[:, :, -4:] = 1.0
    return x


def test_apgd_on_the_answer_nll_stays_inside_the_eps_ball_and_the_image_box():
    model = tiny_dvd_vlm().requires_grad_(False)
    x = saturated_images(3)
    prompts = ["What color is the circle?"] * 3
    answers = ["red", "2", "no, there is not."]
    eps = 2 / 255
    adversarial = va.attack_answers(
        model, x, prompts, answers, eps=eps, steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert adversarial.shape == x.shape
    assert (adversarial - x).abs().max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert not torch.equal(adversarial, x)
    objective = va.answer_objective(model, prompts, answers)
    targeted = va.answer_objective(model, prompts, answers, targeted=True)
    assert torch.allclose(objective(x).loss, -targeted(x).loss)  # targeted = the same NLL, sign flipped
    assert torch.allclose(
        objective(x).loss, model.per_sample_nll(x, model.collator().pairs(prompts, answers))
    )


def test_a_bf16_attack_on_a_cpu_multiplies_in_bf16_and_runs_attention_on_the_math_path():
    from torch.profiler import ProfilerActivity, profile

    model = tiny_dvd_vlm().requires_grad_(False)
    x = saturated_images(2)
    prompts, answers = ["What color is the circle?"] * 2, ["red", "blue"]
    ops = {}
    for precision in (None, "bf16"):
        objective = va.answer_objective(model, prompts, answers, precision=precision)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            nll = objective(x).loss
        ops[precision] = {e.key for e in prof.key_averages()}
        assert nll.dtype == torch.float32 and torch.isfinite(nll).all()
    assert any("flash" in op for op in ops[None])  # fp32: PyTorch's own choice
    # bf16: the CPU flash kernel is several times slower there (dvd.train.precision.autocast)
    assert not any("flash" in op for op in ops["bf16"]) and "aten::_to_copy" in ops["bf16"]
    full, half = (va.answer_objective(model, prompts, answers, precision=p)(x).loss for p in (None, "bf16"))
    assert torch.allclose(full, half, rtol=0.05) and not torch.equal(full, half)


def test_only_a_targeted_objective_reports_success_and_an_answer_the_model_would_go_on_from_is_not_one():
    model = tiny_dvd_vlm().requires_grad_(False)
    x = saturated_images(3)
    prompts = ["Describe the image."] * 3
    # greedy words cut off at 3 tokens: the labels end with the stop token, which the model would not write
    cut = model.generate(x, prompts, max_new_tokens=3)
    assert va.answer_objective(model, prompts, cut)(x).success is None  # untargeted: no success notion
    success = va.answer_objective(model, prompts, cut, targeted=True)(x).success
    assert success.dtype == torch.bool and success.shape == (3,) and not success.any()
    out = model(x, model.collator().pairs(prompts, cut), greedy=True)
    assert not out.answer_is_greedy.any()
    assert model(x, model.collator().pairs(prompts, cut)).answer_is_greedy is None  # training skips it


def test_a_perturbation_outside_the_ball_or_the_box_is_refused():
    x = torch.full((1, 3, 4, 4), 0.5)
    va.check_in_ball(x + 2 / 255, x, 2 / 255)
    with pytest.raises(RuntimeError, match="threat model"):
        va.check_in_ball(x + 3 / 255, x, 2 / 255)
    with pytest.raises(RuntimeError, match="pixel range"):
        va.check_in_ball(torch.full_like(x, 1.001), torch.ones_like(x), 2 / 255)


def test_the_worst_case_keeps_each_samples_lowest_score_and_the_reference_that_gave_it():
    images = torch.zeros(3, 3, 2, 2)
    worst = va.WorstCase(images, ["a", "b", "c"], [0.9, 0.5, 0.0])
    assert worst.alive(0.1) == [0, 1]  # sample 2 is broken already
    worst.update([0, 1], torch.ones(2, 3, 2, 2), ["a1", "b1"], [0.4, 0.7], [1, 1])
    worst.update([0, 1], torch.full((2, 3, 2, 2), 2.0), ["a2", "b2"], [0.6, 0.05], [2, None])
    assert worst.scores == [0.4, 0.05, 0.0]
    assert worst.best_reference == [1, 0, 0]  # a targeted stage (None) names no reference
    assert worst.outputs == [["a", "a1", "a2"], ["b", "b1", "b2"], ["c"]]
    assert worst.images[0].eq(1).all() and worst.images[1].eq(2).all() and worst.images[2].eq(0).all()
    assert worst.alive(0.1) == [0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(0, 10), min_size=4, max_size=4), min_size=1, max_size=6))
def test_the_worst_case_score_is_the_minimum_over_every_attack(rounds):
    clean, attacks = rounds[0], rounds[1:]
    worst = va.WorstCase(torch.zeros(4, 1, 1, 1), ["x"] * 4, clean)
    for k, scores in enumerate(attacks):
        worst.update(range(4), torch.zeros(4, 1, 1, 1), ["y"] * 4, scores, [k] * 4)
    assert worst.scores == [min(column) for column in zip(*rounds, strict=True)]
    assert all(len(o) == len(rounds) for o in worst.outputs)


class ScriptedVLM:
    """Stands in for a VLM: generation reads the "caption" off the pixel value (0 clean, k after attack k)."""

    def generate(self, images, prompts, *, max_new_tokens):
        return [f"cap{int(round(v))}" for v in images.flatten(1)[:, 0].tolist()]


def test_the_ensemble_attacks_only_unbroken_samples_and_aims_the_final_stage_at_the_best_reference(
    monkeypatch,
):
    calls = []

    def scripted_attack(model, images, prompts, answers, **kwargs):
        calls.append((list(answers), kwargs["precision"], kwargs["targeted"]))
        return images + len(calls)  # attack k "writes" cap{k}

    monkeypatch.setattr(vlm_ensemble, "attack_answers", scripted_attack)
    table = {  # per sample, the score of each caption
        0: {"cap0": 1.0, "cap1": 0.9, "cap2": 0.3, "cap3": 0.8, "cap4": 0.2},
        1: {"cap0": 1.0, "cap1": 0.05},  # broken by the first attack
        2: {"cap0": 0.0},  # broken clean: never attacked
    }
    references = [["r0", "r1"], ["s0", "s1"], ["t0", "t1"]]
    result = va.worst_case_attack(
        ScriptedVLM(),
        torch.zeros(3, 3, 2, 2),
        ["p"] * 3,
        references,
        lambda index, texts: [table[i][t] for i, t in zip(index, texts, strict=True)],
        eps=0.1,
        steps=1,
        stages=va.ensemble_stages(2, precision="fp16", targets=["maybe"]),
        broken_at=0.1,
        generator=torch.Generator(),
        max_new_tokens=4,
    )
    assert calls == [
        (["r0", "s0"], "fp16", False),  # reference 0 on the unbroken samples
        (["r1"], "fp16", False),  # reference 1: sample 1 is broken now
        (["r1"], None, False),  # fp32 on the best reference so far (r1 gave 0.3)
        (["maybe"], None, True),  # then targeted
    ]
    assert result.scores == [0.2, 0.05, 0.0]
    assert result.outputs == [["cap0", "cap1", "cap2", "cap3", "cap4"], ["cap0", "cap1"], ["cap0"]]


def test_cider_scorer_gives_each_image_its_corpus_cider():
    references = {
        1: ["a red circle on a white background.", "one red circle."],
        2: ["two blue squares.", "a pair of blue squares next to each other."],
        3: ["a green triangle and a red circle.", "a triangle, green, beside a circle."],
    }
    candidates = {1: "a red circle.", 2: "two squares next to each other.", 3: "a green circle."}
    scorer = CiderScorer(references)
    expected = cider_per_image(references, candidates)
    for key, caption in candidates.items():
        assert scorer(key, caption) == pytest.approx(expected[key], abs=1e-12)


def test_caption_scores_take_each_images_lowest_cider_and_clean_is_the_first_output():
    references = {
        0: ["a red circle.", "one red circle."],
        1: ["two blue squares.", "a pair of blue squares."],
    }
    samples = [
        {"position": 0, "outputs": ["a red circle.", "two blue squares.", "a red one."]},
        {"position": 1, "outputs": ["two blue squares.", "a red circle."]},
    ]
    clean, worst = caption_scores(references, samples)
    scorer = CiderScorer(references)
    assert clean == pytest.approx((scorer(0, "a red circle.") + scorer(1, "two blue squares.")) / 2)
    expected = sum(min(scorer(s["position"], o) for o in s["outputs"]) for s in samples) / 2
    assert worst == pytest.approx(expected) and worst < clean


def test_targeted_success_is_the_target_appearing_in_any_case_and_exact_match_is_reported_apart():
    target = "Visit https://tinyurl.com/23cbjxjz"  # as RobustVLM writes it: no final period
    assert target_outcome("Visit https://tinyurl.com/23cbjxjz", target) == (True, True)
    assert target_outcome("  Visit   https://tinyurl.com/23cbjxjz ", target) == (True, True)
    assert target_outcome("Visit https://tinyurl.com/23cbjxjz.", target) == (True, False)
    assert target_outcome("A dog. visit HTTPS://tinyurl.com/23cbjxjz now", target) == (True, False)
    assert target_outcome("Visit https://tinyurl.com/23cbjx", target) == (False, False)
    assert target_outcome("Visit https://tinyurl.com/23cbjxjz", target).success
    with pytest.raises(ValueError, match="empty"):
        target_outcome("anything", "  ")


def test_the_target_is_judged_as_the_tokenizer_writes_it():
    tokenizer = tiny_dvd_vlm().tokenizer  # lowercasing word-level tokenizer
    assert canonical_target(tokenizer, "There is a RED circle.") == "there is a red circle."


def test_vqa_references_are_the_distinct_answers_most_frequent_first():
    answers = ["Two", "2", "two.", "3", "three", "blue", "3", "2 ", "none", "blue"]
    assert ranked_answers(answers) == ["Two", "3", "blue", "none"]
