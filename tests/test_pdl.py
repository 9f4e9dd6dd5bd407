"""Programmatic dependent launch: off where it cannot apply, and on the GPU a graph-replayed decode
with it equals the eager decode without it."""

from __future__ import annotations

import pytest
import torch

from lowbit.engine.cuda_graphs import CudaGraphDecoder, GraphDecodeContext
from lowbit.kernels import pdl
from lowbit.quantized_models.synthetic import random_model


def test_launch_options_are_off_on_cpu_and_carry_the_flag_with_the_attribute(monkeypatch):
    assert pdl.launch_options(torch.zeros(1), 1) == {"PDL": False}
    if torch.cuda.is_available():
        x = torch.zeros(1, device="cuda")
        monkeypatch.setenv("LOWBIT_PDL", "0")
        assert pdl.launch_options(x, 1) == {"PDL": False}
        monkeypatch.setenv("LOWBIT_PDL", "1")
        on = pdl.launch_options(x, 1)
        assert on in ({"PDL": False}, {"PDL": True, "launch_pdl": True})
        assert ("launch_pdl" in on) == on["PDL"]
        assert pdl.launch_options(x, 16) == {"PDL": False}


def test_pdl_only_for_launches_of_few_rows(monkeypatch):
    monkeypatch.delenv("LOWBIT_PDL_MAX_ROWS", raising=False)
    assert pdl.takes_rows(1) and pdl.takes_rows(8) and not pdl.takes_rows(9) and not pdl.takes_rows(64)
    assert pdl.takes_rows(None)  # a weight decode: not sized by rows
    monkeypatch.setenv("LOWBIT_PDL_MAX_ROWS", "64")
    assert pdl.takes_rows(64) and not pdl.takes_rows(65)


def _decode_logits(model, tokens_per_step, use_graph: bool) -> list[torch.Tensor]:
    """Logits of a greedy-free decode: step s feeds tokens_per_step[s] at position 8 + s, after a
    prefill-free start (the cache holds zeros: the kernels' numbers, not the model's sense, are
    what is compared)."""
    cfg, dev = model.config, model.device
    batch = tokens_per_step.shape[1]
    block, per_seq = 16, 2
    shape = (cfg.num_layers, batch * per_seq + 1, block, cfg.num_kv_heads, cfg.head_dim)
    k_cache = torch.zeros(shape, dtype=model.dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.arange(batch * per_seq, dtype=torch.int32, device=dev).view(batch, per_seq)
    graphs = None
    if use_graph:
        graphs = CudaGraphDecoder(model, k_cache, v_cache, per_seq, scratch_slot=batch * per_seq * block,
                                  buckets=[batch])
        graphs.capture()
    out = []
    for s, tokens in enumerate(tokens_per_step):
        p = torch.full((batch,), 8 + s, device=dev)
        sl = (tables.long().gather(1, p[:, None] // block) * block + p[:, None] % block).reshape(-1)
        lens = (p + 1).to(torch.int32)
        if graphs is not None:
            logits = graphs.run(tokens, p, sl, tables, lens)
        else:
            ctx = GraphDecodeContext(k_cache, v_cache, sl, tables, lens, cfg.head_dim ** -0.5)
            logits = model.compute_logits(model(tokens, p, ctx))
        out.append(logits.float().clone())
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["qtip2", "vptq2", "gptq4", "fp16"])
@pytest.mark.parametrize("batch", [1, 16])
def test_graph_decode_with_pdl_equals_eager_without(variant, batch, monkeypatch):
    """Every step feeds new tokens, so a kernel that read its input before the previous kernel
    wrote it would see the last step's values: errors of the logits' own size, not rounding."""
    monkeypatch.setenv("LOWBIT_PDL_MAX_ROWS", "64")  # PDL at 16 rows too (off there by default)
    model = random_model("tiny", variant, device="cuda", dtype=torch.float16, seed=5)
    assert pdl.enabled(torch.zeros(1, device="cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    g = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (6, batch), device="cuda", generator=g)
    with torch.inference_mode():
        monkeypatch.setenv("LOWBIT_PDL", "0")
        want = _decode_logits(model, tokens, use_graph=False)
        monkeypatch.setenv("LOWBIT_PDL", "1")
        got = _decode_logits(model, tokens, use_graph=True)
    for s, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = b.abs().max().item()
        assert torch.isfinite(a).all()
        assert (a - b).abs().max().item() <= 2e-2 * scale, f"step {s}"
