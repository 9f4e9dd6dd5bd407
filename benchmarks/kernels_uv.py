"""Kernel benchmark: uniform int2/3/4/8 and VPTQ fused GEMV/GEMM and paged decode attention.

`run(shapes, batches)` returns one dict per (kernel, format, shape, batch); `python -m
benchmarks.kernels_uv` runs the default set and prints a table. Every number beside its baselines
from the same run: cuBLAS fp16 (torch.matmul) on the same shape and batch, and the memory
roofline = bytes that must move (compressed weights + scales/codebooks + x + y, each once) ÷ the
device copy bandwidth measured in this run (read + write bytes of a 1 GiB device-to-device copy).

Timing: the calls are captured in a CUDA graph and replayed (no launch gaps, as the engine's
decode graphs), rotating through enough copies of the weights that they cannot stay in the
50 MB L2; the median of several replays. The fused kernels' tile/split choice comes from their
own tuner's candidates (timed with L2 flushed), run first for each (shape, batch); an int4 row's
candidates include the tensor-core kernel on the layer's fragment layout (`uniform_candidates`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time

import torch

SHAPES = {
    "llama-2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama-3-8b": [(1024, 4096), (14336, 4096), (4096, 14336)],
    "llama-2-70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
}
BATCHES = [1, 2, 4, 8, 16, 32, 64]
DEV = "cuda"

try:  # the team's shared timing helpers, when present (benchmarks/common.py)
    from benchmarks import common as _common  # noqa: F401
except Exception:  # pragma: no cover
    _common = None


# ----------------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------------


def _l2_bytes() -> int:
    return torch.cuda.get_device_properties(0).L2_cache_size


def rotation(nbytes: int, cap: int = 64) -> int:
    """Copies needed so one pass over them moves at least 3× the L2 size."""
    return max(2, min(cap, math.ceil(3 * _l2_bytes() / max(nbytes, 1))))


def graph_us(calls, reps: int | None = None, replays: int = 7) -> float:
    """Median µs per call of `calls` (a rotation of closures) replayed from one CUDA graph."""
    from lowbit.kernels.tuning import graph_ms

    if reps is None:
        reps = max(1, 200 // len(calls))

    def one_pass():
        for c in calls:
            c()

    return graph_ms(one_pass, reps, replays) * 1e3 / (reps * len(calls))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read + written."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    us = graph_us([lambda a=a, b=b: b.copy_(a)], reps=5)
    return 2 * (1 << 30) / us / 1e3


_FP16: dict = {}


def fp16_us(m, n, batch):
    key = (m, n, batch)
    cache = _FP16
    if key not in cache:
        w = torch.randn(m, n, device=DEV, dtype=torch.float16)
        ws = [w] + [w.clone() for _ in range(rotation(w.numel() * 2) - 1)]
        x = torch.randn(batch, n, device=DEV, dtype=torch.float16)
        out = torch.empty(batch, m, device=DEV, dtype=torch.float16)
        cache[key] = graph_us([lambda w=w: torch.matmul(x, w.T, out=out) for w in ws])
    return cache[key]


# ----------------------------------------------------------------------------------------------
# random layers (any bit pattern is a valid code: random words = random codes)
# ----------------------------------------------------------------------------------------------


def uniform_layer(m, n, bits, group, zero_is_min=False):
    from lowbit.kernels import uniform_triton as uq

    vpw = uq.values_per_word(bits)
    words = m // vpw if bits == 3 else m * bits // 32  # 3 bits: the 2-bit plane, 16 outputs a word
    qw = torch.randint(-(2**31), 2**31, (n, words), device=DEV, dtype=torch.int64).to(torch.int32)
    qh = (torch.randint(-(2**15), 2**15, (n, m // 16), device=DEV, dtype=torch.int32).to(torch.int16)
          if bits == 3 else None)
    ng = n // group
    s = (torch.rand(ng, m, device=DEV) * 0.01 + 0.001).half()
    z = ((torch.randn(ng, m, device=DEV) * 0.02).half() if zero_is_min
         else torch.randint(0, 2**bits, (ng, m), device=DEV).half())
    return uq.UniformPacked(bits=bits, group_size=group, in_features=n, out_features=m, qweight=qw,
                            qweight_hi=qh, scales=s, zeros=z, zero_is_min=zero_is_min)


def vptq_layer(m, n, k_r=0, hot: int = 0, device=None):
    """v8-k65536 (2 bits) or v8-k65536-256 (3 bits); hot > 0 confines indices to that many entries.
    On `device` (default the benchmark's, DEV)."""
    from lowbit.kernels import vptq_triton as vq

    dev = device or DEV
    v, k = 8, 65536
    N = m // v
    fb = 16 + (8 if k_r else 0)
    P = -(-n * fb // 32)
    idx = torch.randint(-(2**31), 2**31, (N, P), device=dev, dtype=torch.int64).to(torch.int32)
    if hot:
        idx = idx & ((hot - 1) | ((hot - 1) << 16))
    return vq.VptqPacked(
        in_features=n, out_features=m, v=v, k=k, k_r=k_r, group_num=1, group_size=n, outlier_size=0,
        v_o=0, k_o=0, indices=idx,
        centroids=(torch.randn(1, k * v, device=dev) * 0.02).half(),
        res_centroids=(torch.randn(1, k_r * v, device=dev) * 0.005).half() if k_r else None,
        outlier_centroids=None, outlier_indices=None, perm=None, weight_scale=None, weight_bias=None)


@dataclasses.dataclass
class UniformCase:
    """A uniform layer as the kernel matrix times it: its packed layout (`UniformPacked`: the
    CUDA-core kernels, dequant + cuBLAS) and, for an int4 layer the tensor-core kernel takes, the
    same weight in that kernel's fragment layout (`uniform_frag_triton.UniformFrag`), the layout a
    model's int4 layers are held in (`quantized_models.uniform.use_fragment_layouts`)."""
    packed: object
    frag: object | None = None

    @property
    def in_features(self) -> int:
        return self.packed.in_features

    @property
    def out_features(self) -> int:
        return self.packed.out_features


def uniform_case(p) -> UniformCase:
    """p beside its fragment layout, repacked once here where the layer can take it."""
    from lowbit.kernels import uniform_frag_triton as uf

    return UniformCase(p, None if uf.frag_supported(p) else uf.repack_frag(p))


# The fragment layout's "dequant" (Wᵀ decoded from it for cuBLAS), told apart from the packed layer's.
FRAG_DEQUANT = "frag-dequant"


def uniform_candidates(case: UniformCase, batch: int, dtype=torch.float16) -> list:
    """The packed layer's tuner candidates (`uniform_triton.candidate_configs`) and the fragment
    layout's (`uniform_frag_triton.frag_configs`: the tensor-core kernel for fp16, in 64-row chunks
    past 64 rows, and Wᵀ decoded from that layout for cuBLAS, here kind FRAG_DEQUANT), as a model
    holding either layout would tune them."""
    from lowbit.kernels import uniform_frag_triton as uf
    from lowbit.kernels import uniform_triton as uq

    cands = uq.candidate_configs(case.packed, batch, case.packed.qweight.device)
    if case.frag is not None:
        cands += [c if c.kind == "frag" else dataclasses.replace(c, kind=FRAG_DEQUANT)
                  for c in uf.frag_configs(case.frag, batch, dtype)]
    return cands


def run_uniform(x, case: UniformCase, bias, cfg, out=None):
    """One candidate's launch: "frag" and FRAG_DEQUANT on the fragment layout (`frag_run`), the others
    on the packed one."""
    from lowbit.kernels import uniform_frag_triton as uf
    from lowbit.kernels import uniform_triton as uq

    if cfg.kind not in ("frag", FRAG_DEQUANT):
        return uq.run_config(x, case.packed, bias, cfg, out)
    if out is None:
        out = torch.empty(x.shape[0], case.out_features, dtype=x.dtype, device=x.device)
    if cfg.kind == FRAG_DEQUANT:
        cfg = dataclasses.replace(cfg, kind="dequant")  # the layout's own name for it
    return uf.frag_run(x, case.frag, bias, cfg, out)


def tune_uniform(x, case: UniformCase, bias=None):
    """(fastest, [(config, µs, error)]) over `uniform_candidates`, timed as the layers' tuners time them."""
    from lowbit.kernels.tuning import time_candidates

    out = torch.empty(x.shape[0], case.out_features, dtype=x.dtype, device=x.device)
    return time_candidates(lambda cfg: run_uniform(x, case, bias, cfg, out),
                           uniform_candidates(case, x.shape[0], x.dtype), x.device)


def _clone_uniform(case: UniformCase) -> UniformCase:
    """A weight copy for the rotation, both layouts its own (a shared one would stay in L2)."""
    from lowbit.kernels import uniform_triton as uq

    p = case.packed
    kw = dict(p.__dict__)
    kw["qweight"] = p.qweight.clone()
    if p.qweight_hi is not None:
        kw["qweight_hi"] = p.qweight_hi.clone()
    kw["scales"], kw["zeros"] = p.scales.clone(), p.zeros.clone()
    frag = None if case.frag is None else dataclasses.replace(case.frag, codes=case.frag.codes.clone(),
                                                              sz=case.frag.sz.clone())
    return UniformCase(uq.UniformPacked(**kw), frag)


def _clone_vptq(p):
    from lowbit.kernels import vptq_triton as vq

    kw = dict(p.__dict__)
    kw["indices"] = p.indices.clone()
    kw["centroids"] = p.centroids.clone()
    return vq.VptqPacked(**kw)


# ----------------------------------------------------------------------------------------------
# one (format, shape, batch) measurement
# ----------------------------------------------------------------------------------------------


def _measure(tune, run, p, clone, batch, weight_bytes, check_ref=None):
    """Tune, verify, then time the chosen config and (batch ≥ 8) dequant + cuBLAS; tune(x, p) and
    run(x, p, bias, cfg, out) as a kernel module's `tune` and `run_config`."""
    n, m = p.in_features, p.out_features
    x = torch.randn(batch, n, device=DEV, dtype=torch.float16)
    best, timings = tune(x, p)
    out = torch.full((batch, m), float("nan"), device=DEV, dtype=torch.float16)
    run(x, p, None, best, out)
    err = None
    if check_ref is not None:
        ref = check_ref(x)
        err = float((out.double() - ref).norm() / ref.norm())
    nanfree = not torch.isnan(out).any().item()
    ps = [p] + [clone(p) for _ in range(rotation(weight_bytes) - 1)]
    us = graph_us([lambda q=q: run(x, q, None, best, out) for q in ps])
    deq_us = None
    if batch >= 8:
        cfg = type(best)("dequant")
        deq_us = graph_us([lambda q=q: run(x, q, None, cfg, out) for q in ps[:2]])
    del ps
    return dict(us=us, config=str(best), path=best.kind, dequant_us=deq_us, rel_err=err, nan_free=nanfree,
                tuned=[(str(c), round(t, 2)) for c, t, _ in timings])


def _row(kernel, fmt, model, m, n, batch, weight_bytes, res, bw):
    moved = weight_bytes + batch * (n + m) * 2
    fp16_moved = m * n * 2 + batch * (n + m) * 2
    f16 = fp16_us(m, n, batch)
    r = dict(kernel=kernel, format=fmt, model=model, m=m, n=n, batch=batch, bytes=moved,
             fp16_us=round(f16, 2), fp16_roofline_us=round(fp16_moved / bw / 1e3, 2),
             roofline_us=round(moved / bw / 1e3, 2))
    r.update(res)
    r["us"] = round(res["us"], 2)
    r["gbs"] = round(moved / res["us"] / 1e3, 1)
    r["speedup_vs_fp16"] = round(f16 / res["us"], 2)
    r["pct_roofline"] = round(100 * r["roofline_us"] / res["us"], 1)
    if res.get("dequant_us"):
        r["dequant_us"] = round(res["dequant_us"], 2)
    return r


def bench_uniform(shapes, batches, bw, bits=4, group=128, zero_is_min=False, check=True):
    from lowbit.kernels import uniform_triton as uq

    rows = []
    fmt = f"int{bits}-g{group}" + ("-min" if zero_is_min else "")
    for model, m, n in shapes:
        p = uniform_layer(m, n, bits, group, zero_is_min)
        wb = p.nbytes  # the fragment layout's bytes are the same (codes, then scale and zero per group)
        wref = uq.uniform_packed_dequant_reference(p).double() if check and m * n <= 4096 * 11008 else None
        # a model's int4 layers run the tensor-core kernel on the fragment layout (`use_fragment_layouts`):
        # its launches are timed beside the CUDA-core kernels' (`uniform_candidates`)
        case = uniform_case(p)
        for b in batches:
            ref = (lambda x, w=wref: x.double() @ w.T) if (wref is not None and b in (1, 16)) else None
            res = _measure(tune_uniform, run_uniform, case, _clone_uniform, b, wb, ref)
            rows.append(_row("uniform", fmt, model, m, n, b, wb, res, bw))
            _print_row(rows[-1])
        del case, p, wref
        torch.cuda.empty_cache()
    return rows


def bench_vptq(shapes, batches, bw, k_r=0, hot=0, check=True):
    from lowbit.kernels import vptq_triton as vq

    rows = []
    fmt = "vptq-v8-k65536" + (f"-{k_r}" if k_r else "") + (f"-hot{hot}" if hot else "")
    for model, m, n in shapes:
        p = vptq_layer(m, n, k_r, hot)
        wb = p.nbytes  # indices + codebooks (the 1 MiB codebook is read from L2, counted once)
        wref = vq.vptq_dequant_reference(p).double() if check and m * n <= 4096 * 4096 else None
        for b in batches:
            ref = (lambda x, w=wref: x.double() @ w.T) if (wref is not None and b in (1, 16)) else None
            res = _measure(vq.tune, vq.run_config, p, _clone_vptq, b, wb, ref)
            rows.append(_row("vptq", fmt, model, m, n, b, wb, res, bw))
            _print_row(rows[-1])
        del p, wref
        torch.cuda.empty_cache()
    return rows


def bench_gather(bw):
    """The ceiling for VPTQ lookups: random 16-byte rows of a table read through L2 (or L1)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _gather(tab_ptr, idx_ptr, out_ptr, n, MASK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        i = tl.load(idx_ptr + offs, mask=offs < n, other=0) & MASK
        v = tl.load(tab_ptr + i[:, None] * 8 + tl.arange(0, 8)[None, :])
        tl.store(out_ptr + pid, tl.sum(tl.sum(v.to(tl.float32), 1), 0))

    rows = []
    n = 1 << 24
    tab = torch.randn(65536 * 8, device=DEV, dtype=torch.float16)
    idx = torch.randint(0, 65536, (n,), device=DEV, dtype=torch.int32)
    o = torch.empty(n // 1024, device=DEV)
    for entries in (65536, 16384, 4096):
        us = graph_us([lambda e=entries: _gather[(n // 1024,)](tab, idx, o, n, MASK=e - 1, BLOCK=1024)], reps=5)
        rows.append(dict(kernel="gather", format=f"{entries}x8 fp16 table ({entries * 16 // 1024} KiB)",
                         lookups=n, us=round(us, 1), glookups_s=round(n / us / 1e3, 1),
                         sector_gbs=round(n * 32 / us / 1e3, 0)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_attention(bw):
    from lowbit.kernels.attention import paged_decode_attention

    rows = []
    Hq, Hkv, D, page = 32, 8, 128, 16
    for B, ctx in ((1, 1024), (1, 4096), (16, 1024), (16, 4096), (64, 1024)):
        nb = B * ctx // page
        kv_bytes = 2 * B * ctx * Hkv * D * 2
        R = rotation(kv_bytes, cap=16)
        k = torch.randn(nb * R, page, Hkv, D, device=DEV, dtype=torch.float16)
        v = torch.randn_like(k)
        perm = torch.randperm(nb * R, device=DEV).to(torch.int32)
        tables = [perm[i * nb:(i + 1) * nb].view(B, ctx // page) for i in range(R)]
        lens = torch.full((B,), ctx, device=DEV, dtype=torch.int32)
        q = torch.randn(B, Hq, D, device=DEV, dtype=torch.float16)
        out = torch.empty_like(q)
        us = graph_us([lambda t=t, q=q, k=k, v=v, lens=lens, out=out:
                       paged_decode_attention(q, k, v, t, lens, 1 / math.sqrt(D), out=out) for t in tables])
        moved = kv_bytes + 2 * B * Hq * D * 2 + B * (ctx // page) * 4
        rows.append(dict(kernel="attention", format="fp16 paged, GQA 32/8, D128, page 16", batch=B, ctx=ctx,
                         us=round(us, 2), bytes=moved, gbs=round(moved / us / 1e3, 1),
                         roofline_us=round(moved / bw / 1e3, 2), pct_roofline=round(100 * moved / bw / 1e3 / us, 1)))
        print(json.dumps(rows[-1]), flush=True)
        del k, v
        torch.cuda.empty_cache()
    return rows


def _print_row(r):
    print(json.dumps({k: v for k, v in r.items() if k != "tuned"}), flush=True)


def run(shapes=None, batches=None, formats=("int4", "vptq2"), bw=None):
    """Rows for the shared kernel benchmark: formats among int2/int3/int4/int8/q4_1/vptq2/vptq3."""
    if shapes is None:
        shapes = [(name, m, n) for name, ss in SHAPES.items() for m, n in ss]
    else:
        shapes = [s if len(s) == 3 else ("", s[0], s[1]) for s in shapes]
    batches = batches or BATCHES
    bw = bw or copy_bandwidth_gbs()
    rows = []
    for f in formats:
        if f.startswith("int"):
            bits = int(f[3:])
            rows += bench_uniform(shapes, batches, bw, bits=bits, group=32 if bits == 8 else 128)
        elif f == "q4_1":
            rows += bench_uniform(shapes, batches, bw, bits=4, group=32, zero_is_min=True)
        elif f == "vptq2":
            rows += bench_vptq(shapes, batches, bw)
        elif f == "vptq3":
            rows += bench_vptq(shapes, batches, bw, k_r=256)
    for r in rows:
        r["copy_gbs"] = round(bw, 0)
    return rows


def table(rows) -> str:
    lines = ["| kernel | format | m×n | batch | µs | fp16 µs | speedup | GB/s | % roofline | dequant+cuBLAS µs | path |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"] in ("uniform", "vptq"):
            lines.append(f"| {r['kernel']} | {r['format']} | {r['m']}×{r['n']} | {r['batch']} | {r['us']} | "
                         f"{r['fp16_us']} | {r['speedup_vs_fp16']}x | {r['gbs']} | {r['pct_roofline']} | "
                         f"{r.get('dequant_us') or ''} | {r['path']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="Llama-2-7B shapes, batch 1 and 16")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    t0 = time.time()
    dev = torch.cuda.get_device_name(0)
    bw = copy_bandwidth_gbs()
    print(f"device {dev}; copy bandwidth {bw:.0f} GB/s; torch {torch.__version__}", flush=True)
    allshapes = [(name, m, n) for name, ss in SHAPES.items() for m, n in ss]
    seven = [(n_, m, n) for n_, m, n in allshapes if n_ == "llama-2-7b"]
    rows = []
    if args.quick:
        rows += run(seven, [1, 16], ("int4", "vptq2"), bw)
    else:
        rows += run(allshapes, BATCHES, ("int4", "vptq2"), bw)
        rows += run([("llama-2-7b", 4096, 4096), ("llama-2-70b", 28672, 8192)], [128, 256], ("int4",), bw)
        rows += run(seven, [1, 16], ("int2", "int3", "int8", "q4_1", "vptq3"), bw)
        rows += bench_vptq([("llama-2-7b", 4096, 4096)], [1], bw, hot=4096)
    extra = bench_gather(bw) + bench_attention(bw)
    stamp = datetime.date.today().isoformat()
    meta = dict(device=dev, date=stamp, copy_gbs=round(bw, 0), torch=torch.__version__,
                command=" ".join([sys.executable.split("/")[-1], "-m", "benchmarks.kernels_uv"] + sys.argv[1:]),
                seconds=round(time.time() - t0))
    with open(os.path.join(args.out, "kernels_uv.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, extra=extra), f, indent=1)
    print(json.dumps(meta))
    print(table(rows))


if __name__ == "__main__":
    main()
