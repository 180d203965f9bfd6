"""One specification for every VLM in dvd: ours (open_clip tower + projector + HF LM) and the LLaVA adapter.

Tiny random models: what is checked is the plumbing (which tokens carry loss, where gradients go,
padding, decoding, checkpoints), which does not depend on the weights being trained.
"""

from __future__ import annotations

import pytest
import torch

from dvd.models.vlm import (
    IGNORE_INDEX,
    VisionLanguageModel,
    make_conversation,
)
from dvd.models.vlm_io import load_vlm, save_vlm
from tiny_models import (
    ANSWERS,
    IMAGE_SIZE,
    PROMPTS,
    images,
    qa_batch,
    tiny_dvd_vlm,
    tiny_dvd_vlm_gpt2,
    tiny_hf_llava,
)

BUILDERS = {"dvd": tiny_dvd_vlm, "dvd-gpt2": tiny_dvd_vlm_gpt2, "hf-llava": tiny_hf_llava}


@pytest.fixture(params=sorted(BUILDERS))
def model(request) -> VisionLanguageModel:
    return BUILDERS[request.param]()


def test_per_sample_nll_has_one_finite_value_per_sample_and_loss_is_the_token_mean(model):
    batch = qa_batch(model)
    out = model(images(3), batch)
    assert out.per_sample_nll.shape == (3,)
    assert torch.isfinite(out.per_sample_nll).all() and (out.per_sample_nll > 0).all()
    assert out.n_tokens.tolist() == batch.n_answer_tokens.tolist()
    weighted = (out.per_sample_nll * out.n_tokens).sum() / out.n_tokens.sum()
    torch.testing.assert_close(out.loss, weighted)


def test_labels_are_exactly_the_answer_tokens_and_their_eos(model):
    batch = qa_batch(model)
    tokenizer = model.tokenizer
    for row, answer in enumerate(ANSWERS):
        supervised = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert supervised == tokenizer(answer, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]


def test_nll_is_the_mean_negative_log_likelihood_of_the_answer_tokens(model):
    batch = qa_batch(model)
    x = images(3)
    nll = model.per_sample_nll(x, batch)
    # reference: full logits from the LM, log-probabilities read at the answer positions by hand
    logits = model.causal_lm()(
        inputs_embeds=model.embed(x, batch), attention_mask=batch.attention_mask
    ).logits
    logp = logits.log_softmax(-1)
    for row in range(3):
        positions = (batch.labels[row] != IGNORE_INDEX).nonzero()[:, 0]
        picked = logp[row, positions - 1, batch.labels[row, positions]]
        torch.testing.assert_close(nll[row], -picked.mean(), rtol=1e-5, atol=1e-5)


def test_changing_one_answer_changes_only_that_samples_loss(model):
    x = images(3)
    before = model.per_sample_nll(x, qa_batch(model))
    after = model.per_sample_nll(x, qa_batch(model, [ANSWERS[0], "3", ANSWERS[2]]))
    assert not torch.allclose(before[1], after[1])
    torch.testing.assert_close(before[[0, 2]], after[[0, 2]], rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_a_samples_loss(model):
    x = images(3)
    together = model.per_sample_nll(x, qa_batch(model))
    for row in range(3):
        alone = model.per_sample_nll(
            x[row : row + 1], model.collate([make_conversation(PROMPTS[row], ANSWERS[row])])
        )
        torch.testing.assert_close(together[row], alone[0], rtol=1e-5, atol=1e-5)


def test_gradient_reaches_the_pixels_and_no_frozen_parameter_gets_a_grad(model):
    model.requires_grad_(False)
    x = images(3).requires_grad_(True)
    model.per_sample_nll(x, qa_batch(model)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_each_samples_loss_depends_only_on_its_own_image(model):
    model.requires_grad_(False)
    x = images(3).requires_grad_(True)
    (grad,) = torch.autograd.grad(model.per_sample_nll(x, qa_batch(model))[1], x)
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_attack_gradients_leave_trainable_parameters_untouched(model):
    x = images(3).requires_grad_(True)
    torch.autograd.grad(model.per_sample_nll(x, qa_batch(model)).sum(), x)
    assert all(p.grad is None for p in model.parameters())


def test_param_groups_cover_every_parameter_once(model):
    groups = model.param_groups()
    assert set(groups) == {"vision", "projector", "lm"}
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(groups[name] for name in groups)


def test_gradient_checkpointing_gives_the_same_pixel_gradient(model):
    model.train()
    batch, x = qa_batch(model), images(3)
    plain = torch.autograd.grad(model(x.requires_grad_(True), batch).loss, x)[0]
    model.set_grad_checkpointing(True)
    x2 = images(3).requires_grad_(True)
    checkpointed = torch.autograd.grad(model(x2, batch).loss, x2)[0]
    torch.testing.assert_close(plain, checkpointed)


def test_generate_returns_one_string_per_image(model):
    texts = model.generate(images(3), PROMPTS, max_new_tokens=4)
    assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert model.generate(images(2), "Describe the image briefly.", max_new_tokens=2) != []


def test_batched_generate_equals_one_by_one_generate(model):
    x = images(3)
    batched = model.generate(x, PROMPTS, max_new_tokens=6)
    single = [model.generate(x[i : i + 1], [PROMPTS[i]], max_new_tokens=6)[0] for i in range(3)]
    assert batched == single
    assert any(batched)


def test_generate_with_kv_cache_equals_recomputing_the_whole_sequence(model):
    x = images(3)
    assert model.generate(x, PROMPTS, max_new_tokens=6) == model.generate(
        x, PROMPTS, max_new_tokens=6, use_cache=False
    )


def test_generate_stops_each_sample_at_its_eos(model):
    x = images(2)
    prompts = PROMPTS[:2]
    first_word = model.generate(x[:1], prompts[:1], max_new_tokens=1)[0]
    first = model.tokenizer(first_word, add_special_tokens=False)["input_ids"][0]
    # make sample 0's first greedy token the EOS by swapping the two rows of the output layer
    weight = model.causal_lm().get_output_embeddings().weight
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        weight[[first, eos]] = weight[[eos, first]].clone()
    batched = model.generate(x, prompts, max_new_tokens=5)
    assert batched[0] == ""
    assert batched[1] == model.generate(x[1:], prompts[1:], max_new_tokens=5)[0]


def test_wrong_image_size_and_prompt_count_are_one_line_errors(model):
    with pytest.raises(ValueError, match=f"takes {IMAGE_SIZE}x{IMAGE_SIZE}"):
        model.per_sample_nll(torch.rand(3, 3, 48, 48), qa_batch(model))
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        model.generate(images(3), PROMPTS[:2])
    with pytest.raises(ValueError, match="2 images for a batch of 3"):
        model.per_sample_nll(images(2), qa_batch(model))


def test_save_and_load_restore_identical_outputs(model, tmp_path):
    batch, x = qa_batch(model), images(3)
    save_vlm(model, tmp_path / "vlm", metadata={"step": 7})
    loaded = load_vlm(tmp_path / "vlm")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.template == model.template and loaded.num_image_tokens == model.num_image_tokens
    torch.testing.assert_close(
        loaded.per_sample_nll(x, batch), model.per_sample_nll(x, batch), rtol=0, atol=0
    )
    assert loaded.generate(x, PROMPTS, max_new_tokens=5) == model.generate(x, PROMPTS, max_new_tokens=5)
    assert (
        sorted(p.suffix for p in (tmp_path / "vlm").rglob("*") if p.suffix in {".bin", ".pt", ".pth"}) == []
    )


def test_a_few_training_steps_teach_answers_that_generate_then_returns(model):
    """The tokens trained after the prompt are exactly the ones generation continues from."""
    x = images(2, seed=3)
    prompts, answers = ["What color is the circle?", "What color is the circle?"], ["red", "a blue square."]
    batch = model.collate([make_conversation(p, a) for p, a in zip(prompts, answers, strict=True)])
    trainable = model.param_groups()["projector"] + model.param_groups()["lm"]
    optimizer = torch.optim.Adam(trainable, lr=3e-3)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        model(x, batch).loss.backward()
        optimizer.step()
    model.eval()
    assert model.generate(x, prompts, max_new_tokens=8) == answers
