"""Training precision: ``auto`` per device, bad values refused, bf16 autocast on a CPU (attention on the math
path, a warning where the CPU has no bf16 instructions)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from dvd.config import ConfigError
from dvd.train import precision as P

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert P.training_precision("auto", CUDA) == "bf16"
    assert P.training_precision("auto", CPU) == "fp32"
    assert P.training_precision("fp32", CUDA) == "fp32"


@pytest.mark.parametrize(
    ("value", "message"), [("fp8", "not one of"), ("BF16", "not one of"), ("fp16", "needs CUDA")]
)
def test_bad_precisions_are_refused_with_the_fix(value, message):
    with pytest.raises(ConfigError, match=message):
        P.training_precision(value, CPU)


def test_bf16_on_a_cpu_without_bf16_instructions_warns_and_names_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert P.training_precision("bf16", CPU) == "bf16"
    assert "emulated" in caplog.text and "precision=fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        P.training_precision("bf16", CPU)
    assert caplog.text == ""


def test_native_precision_keeps_bf16_only_where_the_device_multiplies_it(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    assert P.native_precision("bf16", CPU) == "fp32"  # emulated: several times slower than fp32
    assert P.native_precision("bf16", CUDA) == "bf16"
    assert P.native_precision("auto", CUDA) == "bf16" and P.native_precision("auto", CPU) == "fp32"
    assert P.native_precision("fp16", CUDA) == "fp16"
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    assert P.native_precision("bf16", CPU) == "bf16"
    assert P.native_precision("fp32", CPU) == "fp32"


def _attention_ops(precision: str) -> set[str]:
    q = torch.randn(2, 2, 8, 16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with P.autocast(precision, CPU):
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        out.float().sum().backward()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def test_cpu_bf16_autocast_multiplies_in_bf16_and_runs_attention_on_the_math_path():
    a = torch.randn(4, 8)
    with P.autocast("bf16", CPU):
        assert (a @ a.T).dtype == torch.bfloat16
    assert (a @ a.T).dtype == torch.float32
    assert not any("flash" in op for op in _attention_ops("bf16"))
    assert any("math" in op for op in _attention_ops("bf16"))
    assert any("flash" in op for op in _attention_ops("fp32"))  # fp32 keeps PyTorch's own choice


def test_cpu_bf16_step_gives_the_fp32_gradient_to_bf16_accuracy():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    x = torch.randn(4, 10, 32)
    grads = {}
    for precision in ("fp32", "bf16"):
        layer.zero_grad()
        with P.autocast(precision, CPU):
            loss = layer(x).float().pow(2).mean()
        loss.backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in layer.parameters()])
    cosine = F.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.99
    assert not torch.equal(grads["fp32"], grads["bf16"])  # bf16 really ran
