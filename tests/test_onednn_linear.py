"""fp32 linear layers on a CPU through oneDNN: the same values and gradients as PyTorch's ``linear`` up to
rounding, repeatable, only for the tensors it takes, scoped to a block, entered by the ``dvd`` command."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dvd import cli
from dvd import onednn_linear as O

pytestmark = pytest.mark.skipif(not O.available(), reason="this PyTorch has no oneDNN")
ORIGINAL = O._original


def _values_and_grads(fn, x, w, b, grad):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    features=st.integers(1, 40),
    outputs=st.integers(1, 40),
    with_bias=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_values_and_all_three_gradients_match_pytorch(lead, features, outputs, with_bias, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    shape = [*lead, features]
    if transposed and lead:  # a non-contiguous input, as attention's reshapes give
        x = torch.randn(*shape[:-2], features, shape[-2], generator=g).transpose(-1, -2)
    else:
        x = torch.randn(*shape, generator=g)
    w = torch.randn(outputs, features, generator=g)
    b = torch.randn(outputs, generator=g) if with_bias else None
    grad = torch.randn(*lead, outputs, generator=g)
    ours = _values_and_grads(O.linear, x, w, b, grad)
    reference = _values_and_grads(ORIGINAL, x, w, b, grad)
    for a, r in zip(ours, reference, strict=True):
        assert a.shape == r.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_it_runs_oneDNN_and_is_bitwise_repeatable(monkeypatch):
    calls = []
    kernel = O._mm_t
    monkeypatch.setattr(O, "_mm_t", lambda *a: calls.append(a[0].shape) or kernel(*a))
    x, w, b = torch.randn(64, 17, 128), torch.randn(512, 128), torch.randn(512)
    grad = torch.randn(64, 17, 512)
    first = _values_and_grads(O.linear, x, w, b, grad)
    assert calls == [(64 * 17, 128), (64 * 17, 512), (512, 64 * 17)]  # output, input grad, weight grad
    second = _values_and_grads(O.linear, x, w, b, grad)
    assert all(torch.equal(a, c) for a, c in zip(first, second, strict=True))


def test_only_the_gradients_asked_for_are_computed(monkeypatch):
    calls = []
    kernel = O._mm_t
    monkeypatch.setattr(O, "_mm_t", lambda *a: calls.append(a[0].shape) or kernel(*a))
    layer = torch.nn.Linear(8, 4).requires_grad_(False)  # an attack: the input's gradient only
    x = torch.randn(3, 8, requires_grad=True)
    O.linear(x, layer.weight, layer.bias).sum().backward()
    assert calls == [(3, 8), (3, 4)] and x.grad is not None


@pytest.mark.parametrize(
    "case",
    ["bf16", "autocast", "meta device", "tensor subclass", "empty batch", "integer"],
)
def test_other_tensors_go_to_pytorchs_own_linear(case, monkeypatch):
    monkeypatch.setattr(O, "_mm_t", lambda *a: pytest.fail(f"oneDNN used for {case}"))
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    if case == "bf16":
        x, w = x.bfloat16(), w.bfloat16()
    elif case == "meta device":
        x, w = x.to("meta"), w.to("meta")
    elif case == "tensor subclass":
        x = x.as_subclass(type("Marked", (torch.Tensor,), {}))
    elif case == "empty batch":
        x = torch.randn(0, 8)
    elif case == "integer":
        x, w = torch.ones(4, 8, dtype=torch.int64), torch.ones(3, 8, dtype=torch.int64)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = O.linear(x, w)
        assert out.dtype == torch.bfloat16  # autocast still casts it
    else:
        try:
            out = O.linear(x, w)
        except RuntimeError:  # PyTorch's own refusal, if it has one for the case
            return
        assert out.shape == (*x.shape[:-1], 3)


def test_a_second_derivative_is_refused_not_silently_wrong():
    x = torch.randn(2, 3, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    (grad_x,) = torch.autograd.grad(O.linear(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|not .*differentiable|twice"):
        grad_x.sum().backward()


def test_the_block_swaps_functional_linear_nests_and_restores_it():
    assert F.linear is ORIGINAL
    with O.onednn_linear(True) as outer:
        assert outer and O.active()
        with O.onednn_linear(True):
            assert F.linear is O.linear
        assert F.linear is O.linear  # the inner block's exit leaves the outer one's
        with O.onednn_linear(False) as inner:
            assert inner  # a disabled block inside an enabled one does not switch it off
    assert F.linear is ORIGINAL
    with pytest.raises(KeyError), O.onednn_linear(True):
        raise KeyError("a failing job")
    assert F.linear is ORIGINAL


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False), ("off", False)])
def test_the_environment_switches_it_off(value, on, monkeypatch):
    if value is None:
        monkeypatch.delenv(O.ENV, raising=False)
    else:
        monkeypatch.setenv(O.ENV, value)
    with O.onednn_linear() as active:
        assert active is on and (F.linear is O.linear) is on
    assert F.linear is ORIGINAL


def test_modules_and_attention_route_through_it_inside_the_block(monkeypatch):
    calls = []
    kernel = O._mm_t
    monkeypatch.setattr(O, "_mm_t", lambda *a: calls.append(1) or kernel(*a))
    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    x = torch.randn(3, 5, 16)
    reference = block(x)
    assert not calls
    with O.onednn_linear(True):
        ours = block(x)
    assert len(calls) == 4  # the attention's packed in-projection and out-projection, the MLP's two layers
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_the_dvd_command_runs_every_job_inside_the_block(monkeypatch):
    seen = {}
    probe = types.ModuleType("dvd_probe_job")
    probe.cli = lambda argv: seen.setdefault("active", O.active()) and 0
    monkeypatch.setitem(sys.modules, "dvd_probe_job", probe)
    monkeypatch.setitem(cli.COMMANDS, ("probe",), ("dvd_probe_job", "test job"))
    monkeypatch.delenv(O.ENV, raising=False)
    assert cli.main(["probe"]) == 0
    assert seen["active"] is True and F.linear is ORIGINAL
    monkeypatch.setenv(O.ENV, "0")
    seen.clear()
    cli.main(["probe"])
    assert seen["active"] is False
