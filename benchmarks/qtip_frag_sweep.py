"""Sweep of the QTIP fragment kernel's launch shapes, kernel alone, against its own fixed cost:

    python -m benchmarks.qtip_frag_sweep [--batch 1] [--pf 1,2,4] [--regs 0,64] [--shapes 4096x4096,...]
        [--launches "rt,warps,copies[,warp columns[,xf[,peel (1; 0: the masked loop)]]];..."]

For QTIP 2-bit at the `--shapes` (default: three Llama-2-7B projections): every (row tiles a warp, warps,
table copies, warps along the columns (default all: one row group), x in the fragment order (xf = 1),
split, prefetch depth, register cap) of the sweep, timed with `tuning.cold_us` (CUDA-graph replays, cold L2),
and — at 4096×4096, batch 1, the first depth — the same launch with an empty loop (TN = 0: table
build, epilogue and atomics only). The prefetch depth applies to launches without masks
(`even_launch`); the others run the masked loop, one step ahead.
The last lines hold the best frag launch next to the flat kernel and cuBLAS fp16 of the same run.
"""

from __future__ import annotations

import argparse

import torch
import triton

from benchmarks.kernels import qtip_layer
from lowbit.kernels import qtip_frag_triton as f
from lowbit.kernels import qtip_triton as qt
from lowbit.kernels.tuning import cold_us

LAUNCHES = ((2, 8, 16), (4, 8, 16), (4, 4, 16), (1, 16, 16), (2, 16, 16), (4, 8, 32))


def _launch(lin, xh, y, rt, nw, rep, split, empty=False, pf=1, regs=0, wc=0, xf=False, peel=True):
    m, n = lin.out_features, lin.in_features
    wc = wc or nw
    tm, tn, b = m // 16, n // 16, xh.shape[0]
    per = triton.cdiv(triton.cdiv(tn, split), wc) * wc
    grid = (triton.cdiv(tm, rt * (nw // wc)), triton.cdiv(tn, per))
    even = not empty and f.even_launch(tm, tn, b, rt, nw, per, wc, xf)
    xv = f.frag_x_order(xh, f.n_blocks(b)).view(torch.int64) if xf else xh.view(torch.int32)
    return lambda: f._hyb_frag_kernel[grid](
        xv, lin.codes.view(torch.int32), qt._lut32(lin), y, y, tm, 0 if empty else tn, b, n // 2,
        m, per, K=2, RT=rt, NB=f.n_blocks(b), NW=nw, WC=wc, REP=rep, ATOMIC=True, EMULATE=False, PDL=False,
        EVEN=even, PF=pf if even else 1, XF=xf, PEEL=peel or not even, num_warps=nw, num_stages=1, **({"maxnreg": regs} if regs else {}))


def _flat(lin, xf, y, split):
    cfg = qt.QTIPConfig("flat", 16, 256, 1, split)
    return lambda: qt.decode_matmul(lin, xf, cfg, y)


def _mma(lin, xh, y, split):
    cfg = qt.QTIPConfig("mma", 64, 64, max(16, triton.next_power_of_2(xh.shape[0])), split)
    return lambda: qt.decode_matmul(lin, xh, cfg, y)


def _fp16(xh, m, n):
    w16 = torch.empty(n, m, device=xh.device, dtype=torch.float16)
    return lambda: torch.matmul(xh, w16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pf", default="1", help="comma-separated prefetch depths")
    ap.add_argument("--regs", default="0", help="comma-separated register caps a thread (0: the compiler's choice)")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="comma-separated out x in")
    ap.add_argument("--launches", default=None,
                    help="semicolon-separated row tiles,warps,copies (default: the sweep's list)")
    ap.add_argument("--splits", default="1,2,4")
    args = ap.parse_args(argv)
    depths = [int(p) for p in args.pf.split(",")]
    caps = [int(p) for p in args.regs.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    launches = LAUNCHES if args.launches is None else \
        [tuple(int(v) for v in item.split(",")) for item in args.launches.split(";")]
    splits = [int(v) for v in args.splits.split(",")]
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} triton {triton.__version__} batch {args.batch}")
    for m, n in shapes:
        lin = qtip_layer(m, n, 2)
        xh = torch.randn(args.batch, n, device=dev).half()
        y = torch.zeros(args.batch, m, device=dev)
        runs = []
        for rt, nw, rep, *more in launches:
            wc, xf, peel = (list(more) + [0, 0, 1][len(more):])[:3]
            for split in splits:
                for pf, regs in ((p, r) for p in depths for r in caps):
                    us = cold_us(_launch(lin, xh, y, rt, nw, rep, split, pf=pf, regs=regs, wc=wc, xf=bool(xf),
                                         peel=bool(peel)), dev)
                    runs.append((round(us, 2), f"RT={rt} NW={nw} WC={wc or nw} xf={xf} copies={rep} peel={peel} "
                                               f"split={split} pf={pf} regs={regs}"))
                    line = f"{m}x{n} {runs[-1][1]}: {us:.2f} us"
                    if m == n and args.batch == 1 and pf == depths[0] and regs == caps[0] and not more:
                        fixed = cold_us(_launch(lin, xh, y, rt, nw, rep, split, empty=True), dev)
                        line += f" (empty loop {fixed:.2f} us)"
                    print(line, flush=True)
        flat = min(cold_us(_flat(lin, xh.float(), y, s), dev) for s in (2, 4)) if args.batch <= 2 else float("nan")
        mma = min(cold_us(_mma(lin, xh, y, s), dev) for s in (2, 4, 8, 16)) if args.batch >= 16 else float("nan")
        fp16 = cold_us(_fp16(xh, m, n), dev)
        best = min(runs)
        print(f"{m}x{n}: best frag {best[0]:.2f} us ({best[1]}) | flat {flat:.2f} us | mma {mma:.2f} us | "
              f"cuBLAS fp16 {fp16:.2f} us", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
