"""Wᵀ decoded from the int4 fragment layout (`frag_dequantize_t`) against the packed layout's
dequantization (`uniform_dequantize_t`), the prefill path of a GPTQ / AWQ int4 layer:

    python -m benchmarks.frag_dequant [--shapes 12288x4096,...] [--row-tiles 4,8,16]

Per shape: each launch's µs (median of 40, L2 flushed before each call, CUDA events), the packed
dequantization's in the same run, the floor (fp16 Wᵀ written + int4 codes read at the copy
bandwidth measured here), the cuBLAS product of 1000 rows that the decoded weight feeds, and
whether the two layouts decode to the same bits (they must).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from lowbit.kernels import uniform_frag_triton as uf
from lowbit.kernels import uniform_triton as uq

SHAPES = "12288x4096,4096x4096,22016x4096,4096x11008"  # Llama-2-7B's qkv, o, gate|up, down


def median_us(fn, reps: int = 40) -> float:
    fn()
    torch.cuda.synchronize()
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--row-tiles", default="4,8,16", help="16-output row tiles a program (`frag_dequantize_t`)")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    src = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / median_us(lambda: dst.copy_(src)) / 1e3  # GB/s
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}, copy bandwidth {bw:.0f} GB/s")
    print("| out × in | row tiles | µs | packed dequant µs | packed ÷ this | floor µs | cuBLAS 1000 rows µs | same bits |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        gs = args.group
        s = (torch.rand(n // gs, m) * 0.02 + 0.002).half().cuda()
        z = torch.randint(0, 16, (n // gs, m)).half().cuda()
        p = uq.pack_uniform(torch.randint(0, 16, (m, n)), 4, s, z, gs)
        fp = uf.repack_frag(p)
        w_packed = torch.empty(n, m, dtype=torch.float16, device="cuda")
        w_frag = torch.full_like(w_packed, float("nan"))
        packed = median_us(partial(uq.uniform_dequantize_t, p, out=w_packed))
        x = torch.randn(1000, n, dtype=torch.float16, device="cuda")
        y = torch.empty(1000, m, dtype=torch.float16, device="cuda")
        gemm = median_us(partial(torch.matmul, x, w_packed, out=y))
        floor = (2 * m * n + m * n / 2) / bw / 1e3
        for rt in (int(r) for r in args.row_tiles.split(",")):
            us = median_us(partial(uf.frag_dequantize_t, fp, out=w_frag, row_tiles=rt))
            print(f"| {m}×{n} | {rt} | {us:.1f} | {packed:.1f} | {packed / us:.2f} | {floor:.1f} | {gemm:.1f} | "
                  f"{torch.equal(w_packed, w_frag)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
