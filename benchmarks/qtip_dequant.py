"""QTIP prefill path: decoding Ŵ to fp16 (what a prompt chunk of more than 64 tokens pays per layer).

    python -m benchmarks.qtip_dequant [--sweep]

For QTIP 2/3/4-bit at the Llama-2-7B projection shapes (qkv and gate-up fused, as the published
checkpoints store them): `dequantize_codes` (the fragment decode with stores) against the
roofline of its bytes (codes read + fp16 written, at the copy bandwidth measured in the same run)
and, for scale, the cuBLAS fp16 GEMM of a 1,000-token chunk that consumes Ŵ. `--sweep` times the
launch shapes of `frag_dequant` at 2 bits. Every time is `tuning.cold_us` (graph replays, cold L2).
"""

from __future__ import annotations

import argparse

import torch
import triton

from benchmarks.kernels import qtip_layer
from lowbit.bench import copy_bandwidth
from lowbit.kernels import qtip_frag_triton as f
from lowbit.kernels import qtip_triton as qt
from lowbit.kernels.tuning import cold_us

SHAPES = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))  # qkv, o, gate-up, down
LAUNCHES = [(rt, nw, st, cp) for rt in (2, 4) for nw in (4, 8) for st in (4, 8, 16) for cp in (16, 32)]


def dequant_row(m: int, n: int, bits: int, bw: float, tokens: int, dev) -> tuple[float, str]:
    """Time one shape's dequant and its GEMM; the µs and a table row."""
    lin = qtip_layer(m, n, bits)
    w = torch.empty(m, n, device=dev, dtype=torch.float16)
    us = cold_us(lambda: qt.dequantize_codes(lin, out=w), dev)
    roof = (lin.codes.numel() * 2 + w.numel() * 2) / bw * 1e6
    x = torch.randn(tokens, n, device=dev).half()
    gemm = cold_us(lambda: torch.matmul(x, w.T), dev)
    return us, (f"| {bits} | {m}×{n} | {us:.1f} | {roof:.1f} | {100 * roof / us:.0f}% | "
                f"{m * n / us / 1e3:.0f} | {gemm:.1f} |")


def sweep(m: int, n: int, dev) -> str:
    """Every launch shape of `frag_dequant` at 2 bits, best first."""
    lin = qtip_layer(m, n, 2)
    w = torch.empty(m, n, device=dev, dtype=torch.float16)
    lut = qt._lut32(lin)
    runs = []
    for rt, nw, st, cp in LAUNCHES:
        us = cold_us(lambda rt=rt, nw=nw, st=st, cp=cp: f.frag_dequant(lin.codes, lut, 2, w, rt, nw, st, cp), dev)
        runs.append((round(us, 1), f"row_tiles={rt} num_warps={nw} steps={st} copies={cp}"))
    runs.sort()
    return (f"# {m}x{n} sweep, best first: " + "; ".join(f"{u} µs {s}" for u, s in runs[:6])
            + f"\n#   worst: {runs[-1][0]} µs {runs[-1][1]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also time every launch shape at 2 bits")
    ap.add_argument("--tokens", type=int, default=1000, help="prompt chunk of the comparison GEMM")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"# {torch.cuda.get_device_name()} triton {triton.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| bits | out × in | dequant µs | roofline µs | % roofline | G weights/s | "
          f"GEMM {args.tokens} tok µs |")
    print("|---|---|---|---|---|---|---|")
    total = {}
    for bits in (2, 3, 4):
        for m, n in SHAPES:
            us, row = dequant_row(m, n, bits, bw, args.tokens, dev)
            total[bits] = total.get(bits, 0.0) + us
            print(row, flush=True)
    for bits, us in total.items():
        print(f"# {bits}-bit, one decoder layer's four projections: {us:.1f} µs, x32 layers {32 * us / 1e3:.2f} ms")
    if args.sweep:
        for m, n in SHAPES[2:]:
            print(sweep(m, n, dev), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
