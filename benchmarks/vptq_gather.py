"""What bounds the VPTQ batch-1 lookup-GEMV: the codebook gathers, or the kernel around them.

    python -m benchmarks.vptq_gather [--shapes 4096x4096,...] [--sweep]

A v8-k65536 layer (2 bits a weight) reads 2 bytes of index per 8 weights from DRAM and gathers a
16-byte codebook entry for each from a 1 MiB codebook (L2, 32-byte sectors). Per shape, in one run
(`tuning.cold_us`: graph replays, L2 flushed before each call; copy bandwidth measured here):

* cuBLAS fp16 GEMV, and the index stream's floor (index bytes ÷ copy bandwidth);
* the layer's kernel as the tuner picks it, and (`--sweep`) every launch shape of a wider list,
  pipelining stages and warps included;
* the same kernel with every index confined to 256 entries (a 4 KiB codebook that stays in L1):
  the kernel without the L2 gathers' cost;
* a bare gather kernel that only sums the same number of random 16-byte entries: the ceiling any
  lookup-GEMV with this codebook can reach.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmarks.kernels_uv import vptq_layer
from lowbit.bench import copy_bandwidth
from lowbit.kernels import vptq_triton as vq
from lowbit.kernels.tuning import cold_us

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

SHAPES = "4096x4096,12288x4096,22016x4096,4096x11008"  # Llama-2-7B's o, q|k|v, gate|up, down

if triton is not None:

    @triton.jit
    def _gather_sum_kernel(idx_ptr, tab_ptr, out_ptr, n, ITERS: tl.constexpr, BLOCK: tl.constexpr,
                           V: tl.constexpr):
        """Sum of tab[idx[i]] (rows of V fp16) over this program's ITERS·BLOCK indices."""
        pid = tl.program_id(0)
        t = tl.arange(0, V)
        acc = tl.zeros([BLOCK, V], tl.float32)
        for i in range(ITERS):
            o = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
            m = o < n
            e = tl.load(idx_ptr + o, mask=m, other=0).to(tl.int32) & 0xFFFF
            acc += tl.load(tab_ptr + e[:, None] * V + t[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + pid * V + t, tl.sum(acc, 0))


def gather_us(lookups: int, dev, iters=(1, 4, 16), blocks=(256, 1024), warps=(4, 8)) -> tuple[float, str]:
    """Best µs of the bare gather kernel over its launch shapes, and that shape."""
    idx = torch.randint(-(2**15), 2**15, (lookups,), device=dev, dtype=torch.int16)
    tab = (torch.randn(65536 * 8, device=dev) * 0.02).half()
    best = (float("inf"), "")
    for it in iters:
        for bl in blocks:
            grid = triton.cdiv(lookups, it * bl)
            out = torch.empty(grid * 8, device=dev)
            for w in warps:
                def fn(it=it, bl=bl, w=w, out=out, grid=grid):
                    _gather_sum_kernel[(grid,)](idx, tab, out, lookups, ITERS=it, BLOCK=bl, V=8, num_warps=w)
                us = cold_us(fn, dev)
                best = min(best, (us, f"iters {it} block {bl} warps {w}"))
    return best


def sweep_configs(p: vq.VptqPacked, dev) -> list:
    """The tuner's batch-1 candidates and the same tiles with 2 / 3 pipelining stages and 8 warps."""
    base = vq.candidate_configs(p, 1, dev)
    out = list(base)
    for c in base:
        for st, w in ((2, 4), (3, 4), (1, 8), (3, 8)):
            out.append(dataclasses.replace(c, num_warps=w, num_stages=st))
    return out


def measure_shape(shape: str, dev, bw: float, sweep: bool) -> tuple:
    """One table row: fp16, the tuned kernel, the kernel on a 256-entry codebook, the bare gathers."""
    m, n = (int(v) for v in shape.split("x"))
    x = torch.randn(1, n, device=dev, dtype=torch.float16)
    w16 = torch.randn(m, n, device=dev, dtype=torch.float16)
    f16 = cold_us(lambda: torch.matmul(x, w16.T), dev)
    p = vptq_layer(m, n)
    hot = vptq_layer(m, n, hot=256)
    out = torch.empty(1, m, device=dev, dtype=torch.float16)
    best, timings = vq.tune(x, p, cands=sweep_configs(p, dev) if sweep else None)
    for c, t, _ in sorted(timings, key=lambda r: r[1])[:8]:
        print(f"  {shape} {c}: {t:.2f} µs")
    us = cold_us(lambda: vq.run_config(x, p, None, best, out), dev)
    hot_us = cold_us(lambda: vq.run_config(x, hot, None, best, out), dev)
    lookups = (m // 8) * n
    g_us, g_cfg = gather_us(lookups, dev)
    floor = p.indices.numel() * 4 / bw / 1e3
    return shape, f16, us, hot_us, g_us, floor, str(best), g_cfg, lookups


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--sweep", action="store_true", help="also time stages / warps beyond the tuner's list")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev) / 1e9
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}, "
          f"copy bandwidth {bw:.0f} GB/s")
    rows = [measure_shape(shape, dev, bw, args.sweep) for shape in args.shapes.split(",")]
    print("\n| out × in | fp16 µs | VPTQ µs (× fp16) | 256-entry codebook µs | bare gather µs | index floor µs "
          "| G lookups/s: kernel / bare | pick | gather shape |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, f16, us, hot_us, g_us, floor, pick, g_cfg, lk in rows:
        print(f"| {shape} | {f16:.1f} | {us:.1f} ({f16 / us:.2f}x) | {hot_us:.1f} | {g_us:.1f} | {floor:.1f} "
              f"| {lk / us / 1e3:.0f} / {lk / g_us / 1e3:.0f} | {pick} | {g_cfg} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
