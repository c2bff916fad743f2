"""Precision: `auto` picks bf16 on a CPU with native bf16 and fp32 elsewhere; forced values are honoured
or refused with a hint; every method trains under CPU bf16 autocast with a float32 loss; prediction under
bf16 returns float32 probabilities on the model grid and a mask on the input's grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcl_cli.engine import device as dev
from medcl_cli.errors import UsageError
from medcl_cli.methods.precision import in_float32, to_float32

CPU = torch.device("cpu")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend this CPU has (True) or lacks (False) native bf16; the real answer is cached, so patch it."""

    def set_support(value: bool) -> None:
        monkeypatch.setattr(dev, "cpu_bf16_supported", lambda: value)

    return set_support


def test_auto_is_bf16_on_a_cpu_with_native_bf16_and_fp32_without(bf16_cpu):
    bf16_cpu(True)
    assert dev.resolve_precision("auto", CPU) == torch.bfloat16
    assert dev.resolve_precision("bf16", CPU) == torch.bfloat16
    assert dev.resolve_precision("fp32", CPU) == torch.float32
    bf16_cpu(False)
    assert dev.resolve_precision("auto", CPU) == torch.float32
    assert dev.resolve_precision("fp32", CPU) == torch.float32


def test_bf16_without_native_support_and_fp16_on_cpu_are_refused_with_a_hint(bf16_cpu):
    bf16_cpu(False)
    with pytest.raises(UsageError) as e:
        dev.resolve_precision("bf16", CPU)
    assert "native bf16" in e.value.message and "fp32" in (e.value.hint or "")
    for support in (True, False):
        bf16_cpu(support)
        with pytest.raises(UsageError) as e:
            dev.resolve_precision("fp16", CPU)
        assert "CUDA" in e.value.message
    with pytest.raises(UsageError, match="unknown train.precision"):
        dev.resolve_precision("half", CPU)


def test_cpu_flags_decide_when_torch_cannot(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert dev._cpu_flags(info) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert dev._cpu_flags(tmp_path / "missing") == set()


def test_the_autocast_context_is_bf16_on_cpu_and_off_for_fp32():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with dev.autocast(CPU, torch.bfloat16):
        assert (x @ w).dtype == torch.bfloat16
    with dev.autocast(CPU, torch.float32):
        assert (x @ w).dtype == torch.float32


def test_in_float32_runs_a_loss_in_float32_under_autocast():
    seen = {}

    def loss(a: torch.Tensor, b: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
        seen["a"], seen["b"] = a.dtype, b[0].dtype
        return (a @ b[0]).sum() * scale

    a = torch.randn(3, 5, dtype=torch.bfloat16)
    b = [torch.randn(5, 2, dtype=torch.bfloat16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = in_float32(loss)(a, b, scale=2.0)
    assert out.dtype == torch.float32 and seen == {"a": torch.float32, "b": torch.float32}
    assert to_float32(torch.ones(2, dtype=torch.float64)).dtype == torch.float64  # float64 references stay
    assert to_float32({"k": (torch.ones(1, dtype=torch.float16), 3)})["k"][0].dtype == torch.float32


@pytest.mark.parametrize("key", sorted(__import__("medcl_cli.methods", fromlist=["REGISTRY"]).REGISTRY))
def test_every_method_steps_under_cpu_bf16_autocast_with_a_float32_loss(key, tiny_dataset):
    from test_conformance import _setup

    from medcl_cli.data.augment import make_views
    from medcl_cli.data.batches import BatchSource, make_sampler
    from medcl_cli.core.protocol import call_backward, on_step_end

    cfg, stage, slices, spec, cls, method = _setup(key, tiny_dataset)
    sampler = make_sampler(slices, set(method.needs), 4, 0.5, 0, 0, 1, 0, 2)
    buffers = {k: v.dtype for k, v in method.named_buffers()}
    before = {k: v.detach().clone() for k, v in method.named_parameters()}
    opt = torch.optim.SGD(method.parameters(), lr=0.01)
    for step in range(2):  # the second step reads the queues and banks the first one filled
        batch = make_views(BatchSource(slices)[sampler.local_batch(step)], method.n_views, cfg.augment,
                           torch.Generator().manual_seed(step))
        with dev.autocast(CPU, torch.bfloat16):
            out = method.training_step(batch)
        loss = out["loss"]
        assert loss.dtype == torch.float32 and torch.isfinite(loss), (key, loss)
        call_backward(method, out)
        grads = [p.grad for p in method.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        opt.step()
        opt.zero_grad(set_to_none=True)
        on_step_end(method, step)
    assert all(p.dtype == torch.float32 for p in method.parameters())
    assert {k: v.dtype for k, v in method.named_buffers()} == buffers  # EMA teachers, queues, banks stay put
    assert any(not torch.equal(p, before[k]) for k, p in method.named_parameters())


def test_prediction_under_bf16_gives_float32_probabilities_and_the_input_grid(tiny_dataset, monkeypatch):
    from medcl_cli.predict import inference as I
    from medcl_cli.config import load_config
    from medcl_cli.models.unet import build_unet

    cfg = load_config(sets=["data.image_size=32", "model.channels=[4,8,16]"])
    torch.manual_seed(0)
    net = build_unet(cfg.model, 3).eval()
    slices = torch.randn(5, 1, 32, 32)
    monkeypatch.setattr(dev, "cpu_bf16_supported", lambda: True)
    got = list(I.forward_slices(net, slices, CPU, batch_size=2))
    assert [s for s, _ in got] == [0, 2, 4]
    probs = torch.cat([p for _, p in got])
    assert probs.dtype == torch.float32 and probs.shape == (5, 3, 32, 32)
    assert torch.allclose(probs.sum(1), torch.ones(5, 32, 32), atol=1e-5)
    with torch.no_grad():
        ref = torch.softmax(net(slices).logits, 1)
    assert (probs - ref).abs().max() < 0.05  # bf16 forward, float32 softmax: close to the fp32 answer
    vol = np.random.default_rng(0).normal(size=(3, 27, 45)).astype(np.float32)
    mask = I.predict_array(net, vol, {"image_size": 32, "resize": "resize", "normalize": "zscore"}, CPU, 2, 3)
    assert mask.shape == vol.shape and mask.dtype == np.uint8 and mask.max() < 3
