"""Wᵀ decoded from the int4 fragment layout (`frag_dequantize_t`) against the packed layout's
dequantization (`uniform_dequantize_t`), the prefill path of a GPTQ / AWQ int4 layer:

    python -m benchmarks.frag_dequant [--shapes 12288x4096,...] [--row-tiles 4,8,16]

Per shape: each launch's µs (`tuning.cold_us`: graph replays, L2 flushed before each call), the
packed dequantization's in the same run, the floor (fp16 Wᵀ written + int4 codes read at the copy
bandwidth measured here, `lowbit.bench.copy_bandwidth`), the cuBLAS product of 1000 rows that the
decoded weight feeds, and whether the two layouts decode to the same bits (they must).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from lowbit.bench import copy_bandwidth
from lowbit.kernels import uniform_frag_triton as uf
from lowbit.kernels import uniform_triton as uq
from lowbit.kernels.tuning import cold_us

SHAPES = "12288x4096,4096x4096,22016x4096,4096x11008"  # Llama-2-7B's qkv, o, gate|up, down


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--row-tiles", default="4,8,16", help="16-output row tiles a program (`frag_dequantize_t`)")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev) / 1e9  # GB/s
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
        packed = cold_us(partial(uq.uniform_dequantize_t, p, out=w_packed), dev)
        x = torch.randn(1000, n, dtype=torch.float16, device="cuda")
        y = torch.empty(1000, m, dtype=torch.float16, device="cuda")
        gemm = cold_us(partial(torch.matmul, x, w_packed, out=y), dev)
        floor = (2 * m * n + m * n / 2) / bw / 1e3
        for rt in (int(r) for r in args.row_tiles.split(",")):
            us = cold_us(partial(uf.frag_dequantize_t, fp, out=w_frag, row_tiles=rt), dev)
            print(f"| {m}×{n} | {rt} | {us:.1f} | {packed:.1f} | {packed / us:.2f} | {floor:.1f} | {gemm:.1f} | "
                  f"{torch.equal(w_packed, w_frag)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
