"""QTIP Triton kernels and the Triton Hadamard transform equal the plain-PyTorch references.

CPU (default suite): Triton's interpreter on small random layers, every decode mode and K = 2, 3, 4,
batches 1, 3 and 8, every kernel kind (fragment kernel with its PTX emulated, decode-GEMV,
tensor-core GEMM, dequant + matmul), split-K,
outputs NaN-poisoned first; the official golden fixtures through the decode kernel (exact) and a
full forward. GPU (`-m gpu`): Llama projection shapes, the tuned dispatch through QTIPLinear, fp16
and bf16, all golden fixtures.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton")

from lowbit.kernels.fused import rmsnorm_reference, silu_mul_reference  # noqa: E402
from lowbit.kernels.hadamard import hadamard_reference  # noqa: E402
from lowbit.kernels.qtip import qtip_forward_reference  # noqa: E402
from lowbit.kernels.qtip_frag_triton import even_launch  # noqa: E402
from lowbit.quantized_models import linear_from_checkpoint  # noqa: E402
from tests.conftest import kernel_module  # noqa: E402
from tests.qtip_checkpoint import hyb_params, random_layer  # noqa: E402
from tests.test_qtip import FIXTURES, fixture_layer  # noqa: E402

CPU = not torch.cuda.is_available()

ht = kernel_module("lowbit.kernels.hadamard_triton")
qt = kernel_module("lowbit.kernels.qtip_triton")
if CPU:  # qtip_triton imported hadamard_transform before the reload above made it interpreted
    qt.hadamard_transform = ht.hadamard_transform

ONE_MAD = dict(L=16, K=2, V=1, td_x=16, td_y=16, tlut_bits=0, decode_mode="1mad")
THREE_INST = dict(ONE_MAD, decode_mode="3inst")
QUANTLUT = dict(L=12, K=3, V=2, td_x=8, td_y=8, tlut_bits=8, decode_mode="quantlut")
LUT_PADDED = dict(L=10, K=3, V=1, td_x=4, td_y=5, tlut_bits=10, decode_mode="lut")  # 60-bit tile streams


def layer(cfg, m, n, seed=0, rcp=0, tp=8, bias=False, device="cpu"):
    t = random_layer(cfg, m, n, seed=seed, rcp=rcp, tp_rank=tp, bias=bias)
    return linear_from_checkpoint("qtip", cfg, t, n, m).to(device)


def gpu_layer(K, m, n, seed=0, rcp=0, tp=8):
    """A HYB layer of random codes built on the GPU (any bit pattern is a valid trellis walk; the
    checkpoint path is covered on CPU and by the fixtures)."""
    from lowbit.kernels.qtip import QTIPParams
    from lowbit.quantized_models.qtip import QTIPLinear

    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(-(2**15), 2**15, (m // 16, n // 16, 16 * K), device="cuda", generator=g).to(torch.int16)
    SU = (torch.randint(0, 2, (n,), device="cuda", generator=g) * 2 - 1).half()
    SV = (1 + 0.1 * torch.randn(m, device="cuda", generator=g)) / n**0.5
    tlut = torch.randn(512, 2, device="cuda", generator=g).half()
    bias = 0.1 * torch.randn(m, device="cuda", generator=g).half()
    p = QTIPParams(16, K, 2, 16, 16, 9, "quantlut_sym")
    return QTIPLinear(p, n, m, codes, SU, SV, tlut, rcp, tp, bias)


def reference(lin, x):
    """float64 forward of the format from the reference decode (independent of every kernel)."""
    bias = None if lin.bias is None else lin.bias.double()
    return qtip_forward_reference(x.double(), lin.decoded_codes().double(), lin.SU.double(), lin.SV.double(),
                                  lin.rcp, lin.tp_rank, bias)


def rel_err(y, ref):
    assert not torch.isnan(y).any(), "unwritten (NaN) outputs"
    return float((y.double() - ref).norm() / ref.norm())


def check(lin, x, cfg, tol):
    out = torch.full((x.shape[0], lin.out_features), float("nan"), dtype=x.dtype, device=x.device)
    qt.run_config(lin, x, cfg, out)
    err = rel_err(out, reference(lin, x))
    assert err < tol, f"{cfg}: relative error {err:.2e}"


# ----- Hadamard transform ---------------------------------------------------------------------------

HADAMARD_CASES = [
    # n, chunks, rows, transpose
    (512, 1, 1, True),  # power of two: 8 column blocks for one row
    (64, 1, 3, False),
    (256, 4, 5, True),  # a tensor-parallel split: block-diagonal
    (12, 1, 2, False),  # k = 12, P = 1
    (20 * 16, 2, 3, True),  # k = 20 per chunk of 160
    (28 * 32, 1, 1, True),  # k = 28 (Llama-3), column blocks
    (172, 1, 1, False),  # k = 172 (Llama-2), 11 row blocks of A
    (172 * 64, 1, 2, True),  # Llama-2's 11008: 2 column blocks (U [256, 32] per product)
    (172 * 16, 1, 64, False),  # prefill rows: 32 rows of A_172 a program
    (1, 1, 2, False),
]


def check_hadamard(n, chunks, rows, transpose, tol, launch=None):
    """Every fused option (pre, post, bias, alpha, a side buffer to zero) against the float64
    reference, outputs NaN-poisoned first."""
    g = torch.Generator().manual_seed(n + rows)
    x = torch.randn(rows, n, generator=g)
    pre, post, bias = (torch.randn(n, generator=g) for _ in range(3))
    out = torch.full((rows, n), float("nan"))
    zero = torch.full((70,), float("nan"))
    ht.hadamard_transform(x, transpose=transpose, chunks=chunks, pre=pre, post=post, bias=bias, alpha=0.25,
                          out=out, zero=zero, launch=launch)
    ref = hadamard_reference(x.double() * pre.double(), transpose=transpose, chunks=chunks) * 0.25 * post.double()
    ref = ref + bias.double()
    assert not torch.isnan(out).any()
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    assert torch.equal(zero, torch.zeros(70))


@pytest.mark.parametrize("n,chunks,rows,transpose", HADAMARD_CASES)
def test_hadamard_transform_matches_reference(n, chunks, rows, transpose):
    check_hadamard(n, chunks, rows, transpose, 1e-5)


# n, chunks, rows, dot_plan arguments: the product kernel (L = A_k ⊗ S, R = S_q by a product or a
# butterfly), ragged L blocks (M = 172, 192, 344 rows of L), a tensor-parallel split
HADAMARD_DOT_CASES = [
    (4096, 1, 3, dict(q=64)),
    (4096, 1, 2, dict(q=128, ib=32, r_dot=False)),
    (12 * 1024, 1, 2, dict(q=64, ib=64, bk=32)),
    (172 * 64, 1, 2, dict(q=64, ib=64, bk=16)),
    (172 * 128, 1, 1, dict(q=64, ib=32, bk=32, num_warps=8)),
    (172 * 128, 1, 1, dict(q=128, ib=64, bk=16, r_dot=False)),
    (256, 4, 2, dict(q=16, ib=16, bk=16)),
    (28 * 64, 2, 2, dict(q=32, ib=32, bk=16, r_dot=False)),
    # several rows of x a program (prefill): rows past x's in the last program, both R steps
    (172 * 64, 1, 5, dict(q=64, ib=64, bk=16, r_dot=False, br=4)),
    (4096, 1, 3, dict(q=64, br=2)),
    (28 * 64, 2, 3, dict(q=32, ib=32, bk=16, r_dot=False, br=2)),
]


@pytest.mark.parametrize("n,chunks,rows,kw", HADAMARD_DOT_CASES)
@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_product_kernel_matches_reference(n, chunks, rows, kw, transpose):
    check_hadamard(n, chunks, rows, transpose, 1e-6, launch=ht.dot_plan(n // chunks, **kw))


def test_hadamard_plan_takes_the_product_kernel_for_many_rows():
    assert ht.plan(11008, 1)["kernel"] == "butterfly" and ht.plan(4096, 1000)["kernel"] == "butterfly"
    assert ht.plan(11008, ht.DOT_ROWS)["kernel"] == "dot" and ht.plan(12288, 1000)["kernel"] == "dot"
    x = torch.randn(ht.DOT_ROWS, 172 * 64)
    ref = hadamard_reference(x.double(), transpose=True)
    assert (ht.hadamard_transform(x, transpose=True).double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    with pytest.raises(ValueError, match="power of two"):
        ht.dot_plan(172 * 64, 128)
    with pytest.raises(ValueError, match="power of two"):
        ht.dot_plan(4096, 48)
    with pytest.raises(ValueError, match="power of two"):
        ht.dot_plan(4096, 64, br=3)


def test_hadamard_product_kernel_half_precision_signs():
    """fp16 x with a ±1 pre (pre_signs): one half-precision product, as exact as float32 (bf16: on the
    GPU below; Triton's interpreter computes bf16 products wrongly)."""
    dtype = torch.float16
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 172 * 32, generator=g).to(dtype)
    signs = (torch.randint(0, 2, (172 * 32,), generator=g) * 2 - 1).to(dtype)
    y = ht.hadamard_transform(x, transpose=True, pre=signs, alpha=0.5, out_dtype=torch.float32, pre_signs=True,
                              launch=ht.dot_plan(172 * 32, 32, ib=32, bk=16))
    ref = hadamard_reference(x.double() * signs.double(), transpose=True) * 0.5
    assert (y.double() - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("su_scale", [1.0, 0.75])
def test_layer_input_transform_exact_only_for_sign_su(su_scale):
    """A layer whose SU holds scales, not signs, must not take the half-precision product (x · SU would
    round): QTIPLinear reads that at load, and the forward matches the reference either way."""
    t = random_layer(ONE_MAD, 64, 172 * 16, seed=4)
    t["SU"] = t["SU"] * su_scale
    lin = linear_from_checkpoint("qtip", ONE_MAD, t, 172 * 16, 64)
    assert lin.su_signs == (su_scale == 1.0)
    x = torch.randn(ht.DOT_ROWS, 172 * 16).half()
    check(lin, x, qt.QTIPConfig("dequant"), 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 12288, 22016, 11008])
@pytest.mark.parametrize("rows", [1, 16, 1000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_hadamard_transform_real_lengths_gpu(n, rows, dtype):
    """The launch `plan` picks at Llama-2-7B's lengths, activations and SU signs in x's dtype (the
    exact half-precision products) or float32 (the split tf32 ones); float32 out."""
    if CPU:
        pytest.skip("needs CUDA")
    x = torch.randn(rows, n, device="cuda").to(dtype)
    signs = (torch.randint(0, 2, (n,), device="cuda") * 2 - 1).to(dtype)
    y = ht.hadamard_transform(x, transpose=True, pre=signs, alpha=1 / 32, out_dtype=torch.float32, pre_signs=True)
    ref = hadamard_reference(x.double() * signs.double(), transpose=True) / 32
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


# n, rows, launch (None: `plan`'s) for the fragment-order output: the butterfly kernel with k = 1
# and k > 1, the product kernel, a tensor-parallel split
FRAG_ORDER_CASES = [(256, 3, None, 1), (172 * 16, 2, None, 1), (172 * 16, 12, None, 1), (64 * 12, 9, None, 1),
                    (4096, 17, dict(q=64), 1), (4096, 9, dict(q=64, br=4), 1), (512, 5, None, 2)]


@pytest.mark.parametrize("n,rows,kw,chunks", FRAG_ORDER_CASES)
def test_hadamard_writes_the_fragment_order(n, rows, kw, chunks):
    """`frag_nb` writes the same values as the row-major output, permuted as `frag_x_order`
    says; rows past x's are left as they were."""
    from lowbit.kernels.qtip_frag_triton import frag_x_order, n_blocks

    g = torch.Generator().manual_seed(n + rows)
    x = torch.randn(rows, n, generator=g).half()
    pre = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).half()
    launch = ht.dot_plan(n // chunks, **kw) if kw else None
    opts = dict(transpose=True, chunks=chunks, pre=pre, alpha=1 / 32, out_dtype=torch.float16, pre_signs=True,
                launch=launch)
    nb = n_blocks(rows)
    got = ht.hadamard_transform(x, frag_nb=nb, **opts)
    want = frag_x_order(ht.hadamard_transform(x, **opts), nb)
    assert got.shape == (8 * nb, n)
    written = frag_x_order(torch.ones(rows, n), nb).bool()
    assert torch.equal(got[written], want[written])
    with pytest.raises(ValueError, match="fragment-order output"):
        ht.hadamard_transform(x, frag_nb=nb, out=torch.empty(rows, n).half())
    with pytest.raises(ValueError, match="fragment-order output"):
        ht.hadamard_transform(torch.randn(8 * nb + 1, n), frag_nb=nb)


def test_frag_x_order_places_each_b_fragment_in_one_word():
    """Lane 4g + t of n-block b, tile column j finds x[8b + g, 16j + 2t + {0, 1}] and
    x[8b + g, 16j + 8 + 2t + {0, 1}] in its 8-byte word (the mma's two B registers)."""
    from lowbit.kernels.qtip_frag_triton import frag_x_order

    assert qt.xh_rows(qt.QTIPConfig("frag", 64, 32, 8, 1, 4, frag_x=True), 20) == 32
    assert qt.xh_rows(qt.QTIPConfig("frag", 64, 32, 8, 1, 4), 20) == qt.xh_rows(qt.QTIPConfig("mma"), 20) == 20
    x = torch.arange(16 * 48, dtype=torch.float32).reshape(16, 48).half()
    words = frag_x_order(x, 2).view(-1).view(3, 2, 32, 4)  # j, b, lane, (h, e)
    for j, b, g, t in ((0, 0, 0, 0), (2, 1, 7, 3), (1, 0, 5, 2)):
        row = x[8 * b + g, 16 * j:16 * j + 16]
        assert torch.equal(words[j, b, 4 * g + t], torch.stack([row[2 * t], row[2 * t + 1], row[8 + 2 * t],
                                                                row[9 + 2 * t]]))


def test_hadamard_transform_plain_and_cast():
    x = torch.randn(2, 3, 256).half()
    y = ht.hadamard_transform(x, out_dtype=torch.float32)
    assert y.shape == (2, 3, 256) and y.dtype == torch.float32
    assert (y.double() - hadamard_reference(x.double())).abs().max() < 1e-5
    with pytest.raises(ValueError, match="chunks"):
        ht.hadamard_transform(x, chunks=3)


def exact_norm_input(x, w, eps, residual):
    """weight ⊙ RMSNorm(x + residual) in float64 (the residual sum rounded to x's dtype, as the
    residual stream is), and that sum: what the transform's norm input stands for, unrounded."""
    s = x if residual is None else (x + residual)
    v = s.double()
    return w.double() * v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps), s


# n, rows: the butterfly kernel with column blocks (one row), several rows a program, a special
# factor (28, 172: tensor-core A_k with its programs' rows split), a prefill-sized block of rows
NORM_CASES = [(512, 1), (64, 3), (28 * 32, 1), (172 * 16, 2), (1024, 40)]


@pytest.mark.parametrize("n,rows", NORM_CASES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_hadamard_transform_takes_the_rmsnorm(n, rows, with_residual):
    """norm=: RMSNorm(x + residual) ⊙ weight folded into the transform, the residual sum written once
    and exactly (every element, NaN-poisoned first), the output within float32 rounding of the
    unrounded norm."""
    g = torch.Generator().manual_seed(n + rows)
    x, r = (torch.randn(rows, n, generator=g).half() for _ in range(2))
    w = (1 + 0.2 * torch.randn(n, generator=g)).half()
    signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).half()
    res = r if with_residual else None
    res_out = torch.full((rows, n), float("nan")).half() if with_residual else None
    assert ht.takes_norm(n, rows)
    y = ht.hadamard_transform(x, transpose=True, pre=signs, alpha=1 / 32, out_dtype=torch.float32,
                              pre_signs=True, norm=(w, 1e-5, res, res_out))
    v, s = exact_norm_input(x, w, 1e-5, res)
    ref = hadamard_reference(v * signs.double(), transpose=True) / 32
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    if with_residual:
        assert torch.equal(res_out, rmsnorm_reference(x, w, 1e-5, r)[1]) and torch.equal(res_out, s)


def test_fused_inputs_and_rotary_only_on_butterfly_launches_unless_asked(monkeypatch):
    """SiLU·mul and the rotary step ride in the butterfly kernel's launches (few rows); the product
    kernel's (8–255 rows) take them only with LOWBIT_DOT_EPILOGUES=1, prefill tiles never."""
    monkeypatch.delenv("LOWBIT_DOT_EPILOGUES", raising=False)
    assert ht.rotary_plan(12288, 1, 128)["P1"] == 8 and ht.rotary_plan(12288, 1, 96) is None
    assert ht.rotary_plan(12288, ht.DOT_ROWS - 1, 128)["kernel"] == "butterfly"
    assert ht.rotary_plan(12288, ht.DOT_ROWS, 128) is None and ht.rotary_plan(12288, 64, 128) is None
    assert ht.rotary_plan(4096, 64, 128)["kernel"] == "butterfly"  # a power of two: butterfly at any rows
    assert ht.takes_gate(11008, ht.DOT_ROWS - 1) and not ht.takes_gate(11008, ht.DOT_ROWS)
    assert ht.takes_gate(8192, 64) and not ht.takes_gate(8192, ht.PREFILL_ROWS)
    monkeypatch.setenv("LOWBIT_DOT_EPILOGUES", "1")
    assert ht.rotary_plan(12288, ht.PREFILL_ROWS - 1, 128)["Q"] == 128
    assert ht.rotary_plan(12288, ht.PREFILL_ROWS, 128) is None  # prefill keeps its own tiles and launch
    assert ht.takes_gate(11008, ht.PREFILL_ROWS - 1) and not ht.takes_gate(11008, ht.PREFILL_ROWS)


def test_hadamard_norm_only_where_one_program_sees_the_row():
    assert not ht.takes_norm(256, 1, chunks=4)  # tensor-parallel chunks: the norm spans them
    assert not ht.takes_norm(11008, ht.DOT_ROWS)  # the product kernel's programs see parts of the row
    x = torch.randn(ht.DOT_ROWS, 11008).half()
    with pytest.raises(ValueError, match="takes_norm"):
        ht.hadamard_transform(x, norm=(torch.ones(11008).half(), 1e-5, None, None))
    with pytest.raises(ValueError, match="residual_out"):
        ht.hadamard_transform(x[:1, :512], norm=(torch.ones(512).half(), 1e-5, x[:1, :512], None))


# n, rows, launch: the butterfly kernel (power of two, special factor) and the product kernel in
# both precisions (fp16 x with sign pre: one half-precision product; float32 x: split tf32)
GATED_CASES = [(512, 1, None, torch.float16), (172 * 16, 2, None, torch.float16),
               (172 * 64, 3, ht.dot_plan(172 * 64, 64, ib=64, bk=16), torch.float16),
               (172 * 64, 3, ht.dot_plan(172 * 64, 64, ib=32, bk=16, r_dot=False, br=2), torch.float16),
               (172 * 32, ht.DOT_ROWS, None, torch.float32)]


@pytest.mark.parametrize("n,rows,launch,dtype", GATED_CASES)
def test_hadamard_transform_takes_silu_mul(n, rows, launch, dtype):
    """up=: the transform of silu(gate)·up with `silu_mul_reference`'s roundings, from the two halves
    of a fused gate-up output (strided views)."""
    g = torch.Generator().manual_seed(n)
    gate_up = torch.randn(rows, 2 * n, generator=g).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(dtype)
    y = ht.hadamard_transform(gate, transpose=True, pre=signs, alpha=1 / 32, out_dtype=torch.float32,
                              pre_signs=True, up=up, launch=launch)
    ref = hadamard_reference(silu_mul_reference(gate, up).double() * signs.double(), transpose=True) / 32
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # up_activated: x holds silu(gate) already rounded (the gate|up output launch's act_n), only multiplied
    act = torch.nn.functional.silu(gate)
    y_act = ht.hadamard_transform(act, transpose=True, pre=signs, alpha=1 / 32, out_dtype=torch.float32,
                                  pre_signs=True, up=up, up_activated=True, launch=launch)
    assert (y_act.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    with pytest.raises(ValueError, match="differ"):
        ht.hadamard_transform(gate, up=up[:, :-1])
    with pytest.raises(ValueError, match="needs up="):
        ht.hadamard_transform(gate, up_activated=True)


def test_qtip_layers_ask_for_the_gate_activated_where_their_launches_take_it(monkeypatch):
    """The MLP's two questions (`activates_in_launch`, `takes_activated`) on the fused-launch path:
    yes for the gate|up output unless LOWBIT_SILU_IN_OUTPUT=0; the down projection only where its
    input launch takes SiLU·mul (`takes_gate`); no without the fused launches (a CPU tensor)."""
    gate_up, down = layer(hyb_params(2), 2 * 172 * 16, 64), layer(hyb_params(2), 64, 172 * 16)
    like = torch.zeros(3, 64).half()
    assert not gate_up.activates_in_launch(like) and not down.takes_activated(like)
    monkeypatch.setattr(type(gate_up), "_fusing_kernels", lambda self, x: qt)
    assert gate_up.activates_in_launch(like) and down.takes_activated(like)
    assert not down.takes_activated(torch.zeros(ht.PREFILL_ROWS, 64).half())
    monkeypatch.setenv("LOWBIT_SILU_IN_OUTPUT", "0")
    assert not gate_up.activates_in_launch(like)


# n, rows, SiLU'd columns: the butterfly kernel on a power of two and with A_172 (a block of the
# gate half ends inside a program's rows of A's output), the product kernel
ACT_CASES = [(512, 3, 200), (172 * 16, 1, 172 * 8), (172 * 16, 2, 100), (172 * 64, ht.DOT_ROWS, 172 * 32)]


@pytest.mark.parametrize("n,rows,act", ACT_CASES)
def test_hadamard_output_takes_the_silu_of_a_gate_half(n, rows, act):
    """act_n=: the output transform of a gate|up projection with SiLU on the first act_n columns of
    each row, after their rounding to the output dtype (as F.silu of the stored fp16 output); the
    rest exactly as without it; the output NaN-poisoned first."""
    g = torch.Generator().manual_seed(n + rows)
    y_raw = torch.randn(rows, n, generator=g)
    post = torch.rand(n, generator=g) + 0.5
    plain = ht.hadamard_transform(y_raw, post=post, alpha=32.0, out_dtype=torch.float16)
    out = torch.full((rows, n), float("nan")).half()
    got = ht.hadamard_transform(y_raw, post=post, alpha=32.0, out=out, act_n=act)
    assert not torch.isnan(got).any()
    assert torch.equal(got[:, act:], plain[:, act:])
    want = torch.nn.functional.silu(plain[:, :act])
    assert torch.allclose(got[:, :act].float(), want.float(), rtol=1e-3, atol=1e-6)
    assert not torch.allclose(got[:, :act].float(), plain[:, :act].float(), rtol=1e-2)
    with pytest.raises(ValueError, match="must lie in"):
        ht.hadamard_transform(y_raw, act_n=n + 1)


# heads (q, kv), head_dim, rows: the butterfly kernel on a power of two (a program's rows are
# batch rows) and with A_12 (a head a row of A's output), the product kernel (q = head_dim)
ROTARY_CASES = [((4, 2), 16, 3), ((16, 4), 16, 1), ((8, 2), 32, ht.DOT_ROWS), ((8, 8), 32, 2)]


@pytest.mark.parametrize("heads,head_dim,rows", ROTARY_CASES)
@pytest.mark.parametrize("with_cache", [True, False])
def test_hadamard_output_transform_takes_the_rotary_step(heads, head_dim, rows, with_cache, monkeypatch):
    """rotary=: the output of a fused q|k|v projection with its q/k heads rotated (rotate-half at each
    token's position) and, with a cache, k and v written at scattered slots; against the same
    transform followed by the reference rotary and KV store (the product kernel's launch with
    LOWBIT_DOT_EPILOGUES=1, which offers it)."""
    from lowbit.kernels.fused import QKVRotary, rotary_qkv_

    monkeypatch.setenv("LOWBIT_DOT_EPILOGUES", "1")

    hq, hkv = heads
    n = (hq + 2 * hkv) * head_dim
    g = torch.Generator().manual_seed(n + rows)
    y_raw = torch.randn(rows, n, generator=g)
    post = torch.rand(n, generator=g) + 0.5
    positions = torch.randint(0, 500, (rows,), generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    assert ht.rotary_plan(n, rows, head_dim) is not None
    caches = slots = None
    if with_cache:
        caches = [torch.full((3 * rows + 2, hkv, head_dim), float("nan")).half() for _ in range(2)]
        slots = torch.randperm(3 * rows + 2, generator=g)[:rows]
    work = QKVRotary(positions, inv_freq, hq, hkv, head_dim, None if caches is None else (*caches, slots))
    got = ht.hadamard_transform(y_raw, post=post, alpha=32.0, out_dtype=torch.float16, rotary=work)
    plain = ht.hadamard_transform(y_raw, post=post, alpha=32.0, out_dtype=torch.float16)
    ref_caches = [torch.full_like(c, float("nan")) for c in caches] if caches else None
    want = rotary_qkv_(plain.clone(), QKVRotary(positions, inv_freq, hq, hkv, head_dim,
                                                None if caches is None else (*ref_caches, slots)))
    assert not torch.isnan(got).any()
    assert (got.float() - want.float()).abs().max() <= 2e-3 * want.float().abs().max()
    v0 = (hq + hkv) * head_dim
    assert torch.equal(got[:, v0:], plain[:, v0:])  # v passes through
    if with_cache:
        kv = got[:, hq * head_dim:].reshape(rows, 2, hkv, head_dim)
        for which in range(2):
            assert torch.equal(caches[which][slots], kv[:, which])
            assert torch.isnan(caches[which][torch.ones(3 * rows + 2, dtype=torch.bool).index_fill_(0, slots, False)]).all()
    with pytest.raises(ValueError, match="no rotary launch"):
        ht.hadamard_transform(y_raw, rotary=dataclasses.replace(work, num_heads=hq + 1))


@pytest.mark.parametrize("batch,cfg", [(1, qt.QTIPConfig("frag", 32, 64, 8, 2, 4)),
                                       (3, qt.QTIPConfig("gemv", 16, 32, 4, 2)),
                                       (8, qt.QTIPConfig("dequant"))])
def test_qtip_layer_takes_the_norm_and_the_activation(batch, cfg, monkeypatch):
    """qtip_forward_normed / qtip_forward_gated (what QTIPLinear.forward_normed/forward_gated run on
    the GPU) equal the layer applied to the unfused norm and SiLU·mul."""
    lin = layer(hyb_params(2), 64, 256, seed=batch, bias=True)
    monkeypatch.setattr(qt, "choose_config", lambda layer, x: cfg)
    g = torch.Generator().manual_seed(batch)
    x, r = (torch.randn(batch, 256, generator=g).half() for _ in range(2))
    w = (1 + 0.2 * torch.randn(256, generator=g)).half()
    y, res = qt.qtip_forward_normed(lin, x, w, 1e-5, r)
    v, s = exact_norm_input(x, w, 1e-5, r)
    assert torch.equal(res, s)
    assert rel_err(y, reference(lin, v)) < 2e-3
    y0, res0 = qt.qtip_forward_normed(lin, x, w, 1e-5, None)
    assert res0 is x and rel_err(y0, reference(lin, exact_norm_input(x, w, 1e-5, None)[0])) < 2e-3
    ya, res_a = qt.qtip_forward_normed(lin, x, w, 1e-5, r, activate=20)  # a gate half of 20 columns
    assert torch.equal(res_a, s) and rel_err(ya[:, 20:], y[:, 20:]) < 1e-3
    assert rel_err(ya[:, :20], torch.nn.functional.silu(y[:, :20])) < 2e-3
    gate_up = torch.randn(batch, 512, generator=g).half()
    gate, up = gate_up.chunk(2, dim=-1)
    y = qt.qtip_forward_gated(lin, gate, up)
    assert rel_err(y, reference(lin, silu_mul_reference(gate, up))) < 2e-3
    y = qt.qtip_forward_gated(lin, torch.nn.functional.silu(gate), up, activated=True)
    assert rel_err(y, reference(lin, silu_mul_reference(gate, up))) < 2e-3



@pytest.mark.parametrize("n,rows", [(256, 1), (256, 3), (512, 20), (64, 2)])
def test_hadamard_takes_the_output_transform_before_the_norm(n, rows):
    """`before=`: the layer before's output transform, the residual add, the RMSNorm and the input
    transform in one launch equal the two launches (output stored in fp16, then the normed input
    transform): bit for bit where a program takes whole rows (P1 = 1: the same butterfly passes),
    else to float32's rounding of the same sums in another order; residual_out NaN-poisoned first."""
    g = torch.Generator().manual_seed(n + rows)
    y_raw = 3 * torch.randn(rows, n, generator=g)
    post, bias, res, w = (torch.randn(*shape, generator=g).half() for shape in ((n,), (n,), (rows, n), (n,)))
    pre = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).half()
    into = dict(transpose=True, pre=pre, alpha=1 / 32, out_dtype=torch.float16, pre_signs=True)
    o = ht.hadamard_transform(y_raw, post=post, bias=bias, alpha=32.0, out_dtype=torch.float16)
    res_two = torch.empty_like(res)
    two = ht.hadamard_transform(o, norm=(w, 1e-5, res, res_two), **into)
    res_one = torch.full_like(res, float("nan"))
    one = ht.hadamard_transform(y_raw, norm=(w, 1e-5, res, res_one), before=(post, bias, 32.0), **into)
    assert not torch.isnan(res_one).any()
    assert ht.takes_chain(n, rows) == (ht.plan(n, rows)["P1"] == 1)  # taken only where a program has its row
    if ht.plan(n, rows)["P1"] == 1:
        assert torch.equal(res_one, res_two) and torch.equal(one, two)
    else:  # an fp16 rounding of the residual sum may flip: one unit in its last place
        assert ((res_one.float() - res_two.float()).abs() <= 2e-3 * res_two.float().abs().max()).all()
        assert (one.float() - two.float()).abs().max() <= 2e-3 * two.float().abs().max()
    with pytest.raises(ValueError, match="takes_chain"):
        ht.hadamard_transform(y_raw, norm=(w, 1e-5, None, None), before=(post, bias, 32.0), **into)
    assert not ht.takes_chain(172 * 16, rows)


def test_chain_split_switch_takes_the_chain_where_a_row_is_split(monkeypatch):
    """LOWBIT_CHAIN_SPLIT=1 (the A/B switch of `benchmarks.pdl_ab --knob chain-split`) takes the chain
    where a row is split over several programs too, and never for a length with an odd factor."""
    assert ht.plan(4096, 1)["P1"] > 1 and not ht.takes_chain(4096, 1)
    monkeypatch.setenv("LOWBIT_CHAIN_SPLIT", "1")
    assert ht.takes_chain(4096, 1) and ht.takes_chain(4096, 16)
    assert not ht.takes_chain(172 * 64, 1)


def test_qtip_pending_output_rides_in_the_next_layers_input_launch(monkeypatch):
    """A layer's `PendingOutput` (output transform not run) handed to the next layer's
    qtip_forward_normed gives what its finished output gives, exactly; where the chain cannot be
    taken (no residual, a non-power-of-two output) the output is finished first or never pending."""
    from lowbit.quantized_models.linear import PendingOutput

    a = layer(hyb_params(2), 256, 64, seed=1, bias=True)
    b = layer(hyb_params(2), 64, 256, seed=2)
    monkeypatch.setattr(qt, "choose_config", lambda layer, x: qt.QTIPConfig("frag", 32, 64, 8, 2, 4))
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(12, 64, generator=g).half(), torch.randn(12, 256, generator=g).half()  # P1 = 1
    w = (1 + 0.2 * torch.randn(256, generator=g)).half()
    pending = qt.qtip_forward_pending(a, x)
    assert isinstance(pending, PendingOutput) and pending.raw.dtype == torch.float32
    out = pending.finish()
    assert rel_err(out, reference(a, x)) < 2e-3
    y_one, res_one = qt.qtip_forward_normed(b, pending, w, 1e-5, r)
    y_two, res_two = qt.qtip_forward_normed(b, out, w, 1e-5, r)
    assert torch.equal(res_one, res_two) and torch.equal(y_one, y_two)
    y0, res0 = qt.qtip_forward_normed(b, pending, w, 1e-5, None)  # the first layer: no residual
    assert torch.equal(res0, out) and torch.equal(y0, qt.qtip_forward_normed(b, out, w, 1e-5, None)[0])
    odd = layer(hyb_params(2), 12 * 16, 64, seed=4)  # 192 = 12·16 outputs: the chain takes powers of two
    assert not isinstance(qt.qtip_forward_pending(odd, x), PendingOutput)
    assert qt._chained(pending, b, r) is not None and qt._chained(qt.qtip_forward_pending(a, x[:3]), b, r[:3]) is None
    gated = qt.qtip_forward_gated(b, x, x, pending=True)
    assert isinstance(gated, PendingOutput) and torch.equal(gated.finish(), qt.qtip_forward_gated(b, x, x))
    monkeypatch.setenv("LOWBIT_CHAIN_OUTPUTS", "0")  # the A/B switch: no pending outputs at all
    assert torch.equal(qt.qtip_forward_pending(a, x), out)


@pytest.mark.parametrize("batch", [1, ht.DOT_ROWS])
def test_qtip_qkv_layer_takes_norm_and_rotary(batch, monkeypatch):
    """A fused q|k|v layer (24 heads of 16: 12·32 outputs, A_12) through qtip_forward_normed with the
    rotary step and a KV cache, against the reference layer on the unrounded norm, then the
    reference rotary: in the output launch at batch 1, in its own launch where the product kernel's
    tile is not a head (q = 32 at 8 rows)."""
    from lowbit.kernels.fused import QKVRotary, rotary_qkv_

    lin = layer(hyb_params(2), 384, 256, seed=batch)
    monkeypatch.setattr(qt, "choose_config", lambda layer, x: qt.QTIPConfig("gemv", 16, 32, 4, 2))
    g = torch.Generator().manual_seed(batch)
    x, r = (torch.randn(batch, 256, generator=g).half() for _ in range(2))
    w = (1 + 0.2 * torch.randn(256, generator=g)).half()
    positions = torch.randint(0, 100, (batch,), generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    caches = [torch.full((batch + 3, 4, 16), float("nan")).half() for _ in range(2)]
    slots = torch.randperm(batch + 3, generator=g)[:batch]
    assert qt.takes_rotary(lin, batch, 16) == (batch == 1)
    y, res = qt.qtip_forward_normed(lin, x, w, 1e-5, r, QKVRotary(positions, inv_freq, 16, 4, 16, (*caches, slots)))
    v, s = exact_norm_input(x, w, 1e-5, r)
    want = rotary_qkv_(reference(lin, v).half(), QKVRotary(positions, inv_freq, 16, 4, 16))
    assert torch.equal(res, s) and rel_err(y, want.double()) < 3e-3
    assert torch.equal(caches[0][slots], y[:, 256:320].reshape(batch, 4, 16))
    assert torch.equal(caches[1][slots], y[:, 320:].reshape(batch, 4, 16))


# ----- HYB (published layout) -----------------------------------------------------------------------

# (K, m, n, batch, config): every kind and batch the issue names; odd tile counts exercise masks.
# frag: "even" launches (whole steps, every row tile, x rows a power of two past 8) take the
# unmasked loop, the others the masked one
HYB_CASES = [
    (2, 64, 256, 1, qt.QTIPConfig("frag", 32, 64, 8, 2, 4)),  # even: 2 steps a warp
    (3, 96, 160, 3, qt.QTIPConfig("frag", 32, 32, 8, 1, 2)),  # even: 5 steps
    (4, 96, 64, 8, qt.QTIPConfig("frag", 64, 32, 8, 2, 2)),  # 6 row tiles by 4: masked
    (4, 64, 64, 2, qt.QTIPConfig("frag", 16, 32, 8, 1, 2)),  # even
    (2, 32, 128, 5, qt.QTIPConfig("frag", 16, 64, 8, 1, 4)),  # even
    (2, 32, 64, 1, qt.QTIPConfig("frag", 16, 64, 8, 1, 4)),  # even: one step, no loop
    (2, 32, 64, 1, qt.QTIPConfig("frag", 16, 64, 8, 1, 4, prefetch=3)),  # even: prefetch past the end
    (3, 96, 160, 2, qt.QTIPConfig("frag", 32, 32, 8, 1, 2, prefetch=4)),  # even: 5 steps, 4 ahead
    (4, 64, 128, 1, qt.QTIPConfig("frag", 32, 32, 8, 2, 2, prefetch=1)),  # even: 2 steps, 1 ahead
    (3, 96, 160, 1, qt.QTIPConfig("frag", 32, 32, 8, 1, 2, max_registers=48)),  # even, a register cap
    (3, 64, 128, 16, qt.QTIPConfig("frag", 32, 32, 8, 2, 2)),  # even: 2 full n-blocks
    (3, 64, 96, 12, qt.QTIPConfig("frag", 32, 32, 8, 2, 2, table_copies=16)),  # 2 n-blocks, masked
    (2, 96, 64, 37, qt.QTIPConfig("frag", 64, 64, 8, 1, 4)),  # 8 n-blocks (5 used), ragged rows
    # the epilogue's warp sums in 4 rounds (8 table copies hold 32 of the 128 registers a round)
    (2, 96, 64, 37, qt.QTIPConfig("frag", 64, 64, 8, 1, 4, table_copies=8)),
    (3, 96, 256, 2, qt.QTIPConfig("frag", 48, 128, 8, 1, 8)),  # even: 3 row tiles, 12 registers on 8 warps
    # 16 warps sum 8 registers a round (8 copies' space): half the threads' words lie past the round
    (2, 32, 256, 20, qt.QTIPConfig("frag", 16, 256, 8, 1, 16, table_copies=8)),
    # row groups (warps along the rows as well as the columns), x in the fragment order
    (2, 128, 128, 16, qt.QTIPConfig("frag", 64, 32, 8, 1, 4, frag_x=True)),  # even: 2 groups of 2 row tiles
    (3, 96, 96, 37, qt.QTIPConfig("frag", 32, 32, 8, 2, 4, frag_x=True)),  # masked: 8 n-blocks, splits
    (2, 64, 128, 12, qt.QTIPConfig("frag", 64, 16, 8, 1, 4, frag_x=True, prefetch=3)),  # even: 4 groups, 1 column
    (4, 96, 64, 20, qt.QTIPConfig("frag", 32, 32, 8, 1, 4)),  # masked: row-major x in 2 groups
    (2, 64, 64, 1, qt.QTIPConfig("frag", 32, 32, 8, 1, 4, frag_x=True)),  # even: one n-block
    # masked (6 row tiles by 4), 64 rows, the epilogue in 2 rounds of 32 registers (8 table copies)
    (2, 96, 128, 64, qt.QTIPConfig("frag", 64, 32, 8, 2, 4, table_copies=8, frag_x=True)),
    # the masked loop in place of the peeled one: 5 steps 4 ahead, and one step 3 ahead
    (3, 96, 160, 2, qt.QTIPConfig("frag", 32, 32, 8, 1, 2, prefetch=4, peel=False)),
    (2, 32, 64, 1, qt.QTIPConfig("frag", 16, 64, 8, 1, 4, prefetch=3, peel=False)),
    (2, 64, 256, 1, qt.QTIPConfig("flat", 16, 64, 1, 2)),
    (3, 96, 160, 1, qt.QTIPConfig("flat", 32, 64, 1, 1)),
    (4, 64, 96, 1, qt.QTIPConfig("flat", 16, 32, 1, 3, lut_smem=False)),
    (4, 96, 128, 2, qt.QTIPConfig("flat", 64, 64, 2, 1)),
    (2, 64, 256, 1, qt.QTIPConfig("gemv", 16, 64, 1, 2)),
    (3, 96, 160, 1, qt.QTIPConfig("gemv", 32, 64, 1, 1)),
    (4, 64, 96, 1, qt.QTIPConfig("gemv", 16, 32, 1, 3, lut_smem=False)),
    (2, 32, 96, 3, qt.QTIPConfig("gemv", 16, 32, 4, 2)),
    (3, 64, 64, 3, qt.QTIPConfig("mma", 32, 32, 16, 1)),
    (4, 32, 128, 8, qt.QTIPConfig("mma", 32, 32, 16, 2)),
    (2, 64, 64, 8, qt.QTIPConfig("gemv", 16, 32, 4, 1)),
    (4, 32, 64, 3, qt.QTIPConfig("dequant")),
    (3, 64, 96, 8, qt.QTIPConfig("dequant")),
]


def test_frag_cases_cover_the_even_and_the_masked_loop():
    """The comments of HYB_CASES hold: both loops of the fragment kernel are exercised."""
    kinds = []
    for _, m, n, batch, cfg in HYB_CASES:
        if cfg.kind == "frag":
            rt, wc = cfg.frag_launch()
            steps = -(-(n // 16) // wc)
            per = -(-steps // cfg.split_k) * wc
            kinds.append(even_launch(m // 16, n // 16, batch, rt, cfg.num_warps, per, wc, cfg.frag_x))
    assert kinds == [True, True, False, True, True, True, True, True, True, True, True, False, False, False, True, False,
                     True, False, True, False, True, False, True, True]


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("K,m,n,batch,cfg", HYB_CASES)
def test_hyb_kernels_match_reference_cpu(K, m, n, batch, cfg):
    lin = layer(hyb_params(K), m, n, seed=K * 100 + batch, bias=batch == 3)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(m + n))
    # fp16 operands of the tensor-core and cuBLAS paths round x once (~2^-12)
    check(lin, x, cfg, 1e-5 if cfg.kind in ("gemv", "flat") else 1e-3)


GENERIC_CASES = [
    (ONE_MAD, 32, 64, 1, qt.QTIPConfig("gemv", 16, 32, 1, 2)),
    (ONE_MAD, 32, 64, 8, qt.QTIPConfig("mma", 32, 32, 16, 1)),
    (THREE_INST, 48, 32, 3, qt.QTIPConfig("gemv", 32, 16, 4, 1)),
    (THREE_INST, 32, 64, 8, qt.QTIPConfig("dequant")),
    (QUANTLUT, 24, 48, 1, qt.QTIPConfig("gemv", 16, 16, 1, 2)),
    (QUANTLUT, 24, 48, 3, qt.QTIPConfig("mma", 16, 16, 16, 2)),
    (LUT_PADDED, 8, 20, 3, qt.QTIPConfig("gemv", 16, 16, 4, 1)),
    (LUT_PADDED, 8, 20, 8, qt.QTIPConfig("mma", 16, 16, 16, 1)),
]


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("cfg_dict,m,n,batch,cfg", GENERIC_CASES,
                         ids=lambda v: v["decode_mode"] if isinstance(v, dict) else None)
def test_generic_kernels_match_reference_cpu(cfg_dict, m, n, batch, cfg):
    lin = layer(cfg_dict, m, n, seed=m * n + batch, bias=batch == 1)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(batch))
    check(lin, x, cfg, 1e-5 if cfg.kind == "gemv" else 1e-3)


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("cfg_dict", [hyb_params(3), ONE_MAD, THREE_INST, QUANTLUT, LUT_PADDED],
                         ids=lambda v: f"{v['decode_mode']}_k{v['K']}")
def test_dequantize_codes_is_exact_cpu(cfg_dict):
    m, n = (64, 64) if cfg_dict["td_x"] == 16 else (24, 40)
    lin = layer(cfg_dict, m, n, seed=11)
    w = torch.full((m, n), float("nan"))
    qt.dequantize_codes(lin, out=w)
    assert torch.equal(w, lin.decoded_codes())


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("K,m,n,launch", [
    (2, 96, 160, dict(row_tiles=4, num_warps=2, steps=2, copies=16)),  # ragged row group and split
    (3, 32, 96, dict(row_tiles=2, num_warps=4, steps=2, copies=32)),
    (4, 64, 64, dict(row_tiles=1, num_warps=2, steps=1, copies=16)),
])
def test_frag_dequant_is_exact_for_any_launch_cpu(K, m, n, launch):
    lin = layer(hyb_params(K), m, n, seed=K)
    w = torch.full((m, n), float("nan"), dtype=torch.float16)
    qt.frag_dequant(lin.codes, lin.tlut.view(torch.int32).reshape(-1), K, w, **launch)
    assert torch.equal(w.float(), lin.decoded_codes())


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
def test_frag_launchers_reject_bad_launches_and_operands_cpu():
    lin = layer(hyb_params(2), 32, 64, seed=1)
    lut = lin.tlut.view(torch.int32).reshape(-1)
    y = torch.zeros(1, 32)
    with pytest.raises(ValueError, match="frag kernel: row tiles must be 1..4 and table copies one of .* got 5 and 32"):
        qt.frag_matmul(lin.codes, lut, 2, torch.zeros(1, 64).half(), y, 5, 2, 2, False)
    with pytest.raises(ValueError, match="prefetch depth must be ≥ 1, got 0"):
        qt.frag_matmul(lin.codes, lut, 2, torch.zeros(1, 64).half(), y, 1, 2, 2, False, prefetch=0)
    with pytest.raises(ValueError, match="register cap must be 24..255 \\(0: none\\), got 16"):
        qt.frag_matmul(lin.codes, lut, 2, torch.zeros(1, 64).half(), y, 1, 2, 2, False, max_registers=16)
    with pytest.raises(ValueError, match="warp columns must divide the warps, got 3 of 4"):
        qt.frag_matmul(lin.codes, lut, 2, torch.zeros(1, 64).half(), y, 1, 4, 4, False, warp_cols=3)
    with pytest.raises(ValueError, match=r"x_frag: all 8·n-blocks of them\), got \(1, 64\) torch.float16 for 1 rows"):
        qt.frag_matmul(lin.codes, lut, 2, torch.zeros(1, 64).half(), y, 1, 2, 2, False, x_frag=True)
    with pytest.raises(ValueError, match=r"≤ 64 contiguous fp16 rows \(x_frag: all 8·n-blocks of them\), got \(65, 64\) torch.float16 for 65 rows"):
        qt.frag_matmul(lin.codes, lut, 2, torch.zeros(65, 64).half(), torch.zeros(65, 32), 1, 2, 2, False)
    with pytest.raises(ValueError, match="frag dequant: row tiles .* got 2 and 4"):
        qt.frag_dequant(lin.codes, lut, 2, torch.zeros(32, 64).half(), copies=4)
    with pytest.raises(ValueError, match="contiguous fp16 rows, got torch.float32"):
        qt.frag_dequant(lin.codes, lut, 2, torch.zeros(32, 64))


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
def test_heuristic_dispatch_and_leading_dims_cpu():
    lin = layer(hyb_params(2), 32, 64, seed=5, rcp=2, tp=2)  # output Hadamard split in two blocks
    x = torch.randn(2, 3, 64).half()
    y = qt.qtip_forward(lin, x)
    assert y.shape == (2, 3, 32) and y.dtype == torch.float16
    assert rel_err(y.reshape(6, 32), reference(lin, x.reshape(6, 64))) < 2e-3
    assert qt.heuristic_config(lin, 1, torch.device("cpu")).kind == "flat"
    assert qt.heuristic_config(lin, 3, torch.device("cpu")).kind == "gemv"
    assert qt.heuristic_config(lin, 16, torch.device("cpu")).kind == "mma"
    assert qt.heuristic_config(lin, 512, torch.device("cpu")).kind == "dequant"


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("name", FIXTURES)
def test_golden_fixtures_decode_exactly_cpu(name):
    _, _, lin = fixture_layer(name)
    assert torch.equal(qt.dequantize_codes(lin, torch.float32), lin.decoded_codes())


@pytest.mark.skipif(not CPU, reason="CPU interpreter test")
@pytest.mark.parametrize("name", ["qtip_hyb_k3_256x512", "qtip_hyb_k2_rcp1_tp2_256x512"])
def test_golden_fixture_forward_cpu(name):
    _, t, lin = fixture_layer(name)
    y = qt.qtip_forward(lin, t["x"])
    assert rel_err(y, t["expected_y"].double()) < 1e-5


# ----- GPU: real shapes ----------------------------------------------------------------------------

# Llama-2-7B projections, Llama-3-8B's k=28 MLP dimension, a tensor-parallel split; (config, batch)
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
GPU_RUNS = [
    (qt.QTIPConfig("frag", 64, 128, 8, 4, 8), 1),
    (qt.QTIPConfig("frag", 32, 64, 8, 1, 4, table_copies=16), 3),
    (qt.QTIPConfig("frag", 16, 64, 8, 2, 4), 8),
    (qt.QTIPConfig("frag", 32, 128, 8, 1, 8, table_copies=16, prefetch=4, max_registers=64), 1),
    (qt.QTIPConfig("frag", 32, 128, 8, 2, 8, table_copies=8, prefetch=2, max_registers=48), 1),
    (qt.QTIPConfig("frag", 64, 64, 8, 2, 4, table_copies=16, prefetch=4, max_registers=80), 16),
    (qt.QTIPConfig("frag", 32, 128, 8, 2, 8, table_copies=16), 16),
    (qt.QTIPConfig("frag", 16, 128, 8, 1, 8, table_copies=16), 50),
    (qt.QTIPConfig("frag", 16, 256, 8, 1, 16, table_copies=8), 20),  # epilogue rounds of 8 registers on 16 warps
    # row groups and x in the fragment order: 4 groups of 2 row tiles at 64 rows, 2 of 4 at 16, masked at 50
    (qt.QTIPConfig("frag", 128, 32, 8, 2, 8, table_copies=16, frag_x=True), 64),
    (qt.QTIPConfig("frag", 128, 64, 8, 4, 8, table_copies=16, frag_x=True, prefetch=4), 16),
    (qt.QTIPConfig("frag", 64, 32, 8, 2, 4, table_copies=16, frag_x=True, prefetch=1), 50),
    (qt.QTIPConfig("frag", 64, 16, 8, 8, 4, table_copies=16), 32),  # row-major x, 4 groups of one column
    # the masked loop in place of the peeled one
    (qt.QTIPConfig("frag", 32, 128, 8, 2, 8, table_copies=16, prefetch=4, peel=False), 1),
    (qt.QTIPConfig("frag", 128, 64, 8, 4, 8, table_copies=16, frag_x=True, prefetch=4, peel=False), 16),
    (qt.QTIPConfig("flat", 16, 512, 1, 2), 1),
    (qt.QTIPConfig("flat", 32, 512, 2, 1), 2),
    (qt.QTIPConfig("gemv", 16, 256, 1, 1), 1),
    (qt.QTIPConfig("gemv", 32, 256, 1, 4), 1),
    (qt.QTIPConfig("gemv", 16, 256, 4, 2), 3),
    (qt.QTIPConfig("mma", 64, 64, 16, 2), 8),
    (qt.QTIPConfig("mma", 128, 64, 64, 1), 50),
    (qt.QTIPConfig("dequant"), 100),
]


@pytest.mark.gpu
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_hyb_kernels_match_reference_gpu(K, shape):
    if CPU:
        pytest.skip("needs CUDA")
    m, n = shape
    lin = gpu_layer(K, m, n, seed=K + m)
    for cfg, batch in GPU_RUNS:
        x = torch.randn(batch, n, device="cuda").half()
        check(lin, x, cfg, 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("K", [2, 3, 4])
def test_frag_dequant_matches_reference_gpu(K):
    if CPU:
        pytest.skip("needs CUDA")
    lin = gpu_layer(K, 11008, 4096, seed=K)
    w = qt.dequantize_codes(lin, torch.float16)
    assert torch.equal(w.float().cpu(), lin.cpu().decoded_codes())


@pytest.mark.gpu
@pytest.mark.parametrize("cfg_dict", [ONE_MAD, THREE_INST], ids=lambda v: v["decode_mode"])
def test_generic_kernels_match_reference_gpu(cfg_dict):
    if CPU:
        pytest.skip("needs CUDA")
    lin = layer(cfg_dict, 2048, 4096, seed=3, device="cuda")
    for cfg, batch in ((qt.QTIPConfig("gemv", 32, 64, 1, 4), 1), (qt.QTIPConfig("gemv", 32, 64, 4, 4), 4),
                       (qt.QTIPConfig("mma", 64, 64, 16, 2), 16), (qt.QTIPConfig("dequant"), 80)):
        x = torch.randn(batch, 4096, device="cuda").half()
        check(lin, x, cfg, 2e-3)


@pytest.mark.gpu
def test_tuned_dispatch_through_qtip_linear_gpu():
    """QTIPLinear.forward on CUDA runs these kernels (tuned per batch), fp16 and bf16, any rcp."""
    if CPU:
        pytest.skip("needs CUDA")
    for rcp, tp in ((0, 8), (1, 4), (2, 2)):
        lin = gpu_layer(2, 4096, 4096, seed=rcp, rcp=rcp, tp=tp)
        for batch, dtype in ((1, torch.float16), (2, torch.bfloat16), (16, torch.float16), (300, torch.bfloat16)):
            x = torch.randn(batch, 4096, device="cuda").to(dtype)
            y = lin(x)
            assert y.dtype == dtype and y.shape == (batch, 4096)
            assert rel_err(y, reference(lin, x)) < (2e-3 if dtype == torch.float16 else 1.5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FIXTURES)
def test_golden_fixtures_gpu(name, monkeypatch):
    if CPU:
        pytest.skip("needs CUDA")
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "0")  # heuristic configs: the tuner is covered above
    _, t, lin = fixture_layer(name)
    lin = lin.cuda()
    assert torch.equal(qt.dequantize_codes(lin, torch.float32).cpu(), lin.decoded_codes().cpu())
    y = lin(t["x"].cuda())  # float32 activations: the fused kernels, no fp16 rounding of x
    assert rel_err(y.cpu(), t["expected_y"].double()) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("m,n", [(12288, 4096), (4096, 11008)])
@pytest.mark.parametrize("batch", [1, 16, 200])
def test_qtip_linear_fused_norm_and_activation_gpu(m, n, batch):
    """QTIPLinear.forward_normed / forward_gated (tuned launches, both Hadamard kernels, the norm folded
    where `takes_norm`, else the separate launch) against the layer on the unfused inputs."""
    if CPU:
        pytest.skip("needs CUDA")
    lin = gpu_layer(2, m, n, seed=batch)
    x, r = (torch.randn(batch, n, device="cuda").half() for _ in range(2))
    w = (1 + 0.2 * torch.randn(n, device="cuda")).half()
    y, res = lin.forward_normed(x, w, 1e-5, r)
    v, s = exact_norm_input(x, w, 1e-5, r)
    assert torch.equal(res, s)
    assert rel_err(y, reference(lin, v)) < 3e-3
    gate_up = torch.randn(batch, 2 * n, device="cuda").half()
    gate, up = gate_up.chunk(2, dim=-1)
    assert rel_err(lin.forward_gated(gate, up), reference(lin, silu_mul_reference(gate, up))) < 3e-3
    act = torch.nn.functional.silu(gate)
    assert rel_err(lin.forward_gated(act, up, activated=True), reference(lin, silu_mul_reference(gate, up))) < 3e-3
    if m == 12288:  # Llama-2-7B's q|k|v: 96 heads of 128, the rotary step and the KV write in the output launch
        from lowbit.kernels.fused import QKVRotary, rotary_qkv_

        positions = torch.randint(0, 4000, (batch,), device="cuda")
        inv_freq = (1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))).cuda()
        caches = [torch.full((batch + 5, 32, 128), float("nan"), device="cuda").half() for _ in range(2)]
        slots = torch.randperm(batch + 5, device="cuda")[:batch]
        y, _ = lin.forward_normed(x, w, 1e-5, r, QKVRotary(positions, inv_freq, 32, 32, 128, (*caches, slots)))
        want = rotary_qkv_(reference(lin, v).half(), QKVRotary(positions, inv_freq, 32, 32, 128))
        assert rel_err(y, want.double()) < 3e-3
        assert torch.equal(caches[0][slots], y[:, 4096:8192].reshape(batch, 32, 128))
        assert torch.equal(caches[1][slots], y[:, 8192:].reshape(batch, 32, 128))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4, 16, 300])
def test_qtip_gate_up_output_takes_the_silu_gpu(batch):
    """Llama-2-7B's gate|up (22016 = 172·128 outputs) with `activate=11008`: the gate half SiLU'd in
    the output launch (both Hadamard kernels by row count), the up half as without it."""
    if CPU:
        pytest.skip("needs CUDA")
    lin = gpu_layer(2, 22016, 4096, seed=batch)
    x, r = (torch.randn(batch, 4096, device="cuda").half() for _ in range(2))
    w = (1 + 0.2 * torch.randn(4096, device="cuda")).half()
    plain, _ = lin.forward_normed(x, w, 1e-5, r)
    y, _ = lin.forward_normed(x, w, 1e-5, r, activate=11008)
    assert lin.activates_in_launch(r)
    assert rel_err(y[:, 11008:], plain[:, 11008:].double()) < 1e-3
    assert rel_err(y[:, :11008], torch.nn.functional.silu(plain[:, :11008]).double()) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 16, 64, 300])
def test_qtip_pending_output_chains_into_the_next_layer_gpu(batch):
    """Llama-2-7B's o → gate|up boundary: o_proj's pending output taken by gate_up's input launch
    (tuned launches) equals finishing it first: the residual bit for bit or within an fp16 unit
    where the output transform's blocks sum in another order, the product to rounding. At 1 and 8 rows
    (P1 > 1) the chain is not taken (`takes_chain`) and the output is finished first."""
    if CPU:
        pytest.skip("needs CUDA")
    from lowbit.quantized_models.linear import PendingOutput

    o_proj, gate_up = gpu_layer(2, 4096, 4096, seed=batch), gpu_layer(2, 22016, 4096, seed=batch + 1)
    x, r = (torch.randn(batch, 4096, device="cuda").half() for _ in range(2))
    w = (1 + 0.2 * torch.randn(4096, device="cuda")).half()
    pending = o_proj.forward_pending(x)
    assert isinstance(pending, PendingOutput)
    assert (qt._chained(pending, gate_up, r) is not None) == (batch >= 16)
    y_one, res_one = gate_up.forward_normed(pending, w, 1e-5, r)
    y_two, res_two = gate_up.forward_normed(pending.finish(), w, 1e-5, r)
    assert (res_one.float() - res_two.float()).abs().max() <= 2e-3 * res_two.float().abs().max()
    assert rel_err(y_one, y_two.double()) < 1e-3


@pytest.mark.gpu
def test_qtip_model_on_fused_launches_matches_the_cpu_reference_gpu():
    """A whole (tiny) QTIP model on the GPU — norms and SiLU·mul inside the Hadamard launches — gives
    the logits of its float32 copy on the CPU reference path."""
    import copy

    from lowbit.quantized_models.synthetic import random_model

    if CPU:
        pytest.skip("needs CUDA")
    model = random_model("tiny", "qtip2", device="cuda", dtype=torch.float16, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    got = model.logits(ids.cuda()).double().cpu()
    want = copy.deepcopy(model).to("cpu", torch.float32).logits(ids).double()
    assert float((got - want).norm() / want.norm()) < 1e-2


def _special_order_shape():
    """A tiny Llama shape whose q|k|v (4 + 2·4 heads of 64) and MLP (768) lengths are 12·64: at 8 or
    more rows their transforms run the product kernel, where SiLU·mul and the rotary step take
    launches of their own unless LOWBIT_DOT_EPILOGUES=1 (inside them: the kernel tests above)."""
    import dataclasses

    from lowbit.quantized_models.synthetic import shape_config

    return dataclasses.replace(shape_config("tiny"), intermediate_size=768, num_kv_heads=4, num_layers=1)


@pytest.mark.parametrize("shape,dot_epilogues", [("tiny", "0"), ("special", "0")])
def test_qtip_model_through_the_fused_launches_on_the_interpreter(shape, dot_epilogues, monkeypatch):
    """A whole tiny QTIP model with every projection on the fused launches (norm, SiLU·mul, rotary and
    the pending outputs chained into the next norm; the interpreter stands in for the GPU) gives
    the reference path's logits; with lengths of a special order the product kernel's launches,
    with SiLU·mul and the rotary step inside them or in launches of their own."""
    import copy

    from lowbit.quantized_models import qtip as qtip_linear
    from lowbit.quantized_models.synthetic import random_model

    monkeypatch.setenv("LOWBIT_DOT_EPILOGUES", dot_epilogues)
    cfg = "tiny" if shape == "tiny" else _special_order_shape()
    model = random_model(cfg, "qtip2", device="cpu", dtype=torch.float32, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    want = copy.deepcopy(model).logits(ids).double()
    assert ht.takes_chain(model.config.hidden_size, 12)  # 12 rows: the o → gate|up and down → qkv chains run
    c = model.config
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    fused_here = shape == "tiny" or dot_epilogues == "1"
    assert (ht.rotary_plan(qkv, 12, c.head_dim) is not None) == fused_here
    assert ht.takes_gate(c.intermediate_size, 12) == fused_here
    assert shape == "tiny" or ht.plan(qkv, 12)["kernel"] == ht.plan(c.intermediate_size, 12)["kernel"] == "dot"
    calls = []

    def fusing(self, x):
        calls.append(type(x).__name__)
        return qt if x.dim() == 2 and x.stride(-1) == 1 else None

    chained = []
    transform = qt.hadamard_transform

    activated = []

    def counting(*args, **kwargs):
        chained.append(kwargs.get("before") is not None)
        activated.append(kwargs.get("act_n", 0) > 0 or kwargs.get("up_activated", False))
        return transform(*args, **kwargs)

    monkeypatch.setattr(qtip_linear.QTIPLinear, "_fusing_kernels", fusing)
    monkeypatch.setattr(qt, "choose_config", lambda layer, x: qt.QTIPConfig("frag", 32, 64, 8, 2, 4))
    monkeypatch.setattr(qt, "hadamard_transform", counting)
    got = model.logits(ids).double()
    assert calls and float((got - want).norm() / want.norm()) < 1e-2
    # o → gate|up in every layer, down → the next layer's qkv (the last down feeds the final norm)
    assert sum(chained) == 2 * model.config.num_layers - 1
    # where the down input launch takes SiLU·mul, the gate|up output launch applies the SiLU (act_n) and
    # the down input launch only multiplies (up_activated): two launches a layer
    assert sum(activated) == (2 * model.config.num_layers if fused_here else 0)
