"""Run chosen QTIP fragment-kernel launches a few times each, for a profiler to watch:

    ncu --clock-control none -k regex:_hyb_frag_kernel python -m benchmarks.frag_once \
        --launch 22016x4096:4,4,16,1,4,0 --launch 22016x4096:4,4,16,1,4,80

A launch is `OUTxIN:row_tiles,warps,copies,split,prefetch,max_registers[,peel]` (peel 0: the masked
loop; QTIP 2-bit, random codes, batch `--batch`). Each runs `--reps` times after one warm-up; the
script prints the mean time of the repeats (CUDA events, warm L2: the profiler's own timing is the
one to read).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernels import qtip_layer
from lowbit.kernels import qtip_triton as qt


def parse_launch(text: str) -> tuple[int, int, qt.QTIPConfig]:
    shape, _, launch = text.partition(":")
    m, n = (int(v) for v in shape.split("x"))
    rt, nw, copies, split, pf, regs, *peel = (int(v) for v in launch.split(","))
    cfg = qt.QTIPConfig("frag", 16 * rt, 16 * nw, 8, split, nw, table_copies=copies, prefetch=pf, max_registers=regs,
                        peel=not peel or bool(peel[0]))
    return m, n, cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launch", action="append", required=True, help="OUTxIN:rt,warps,copies,split,pf,max_registers[,peel]")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    for text in args.launch:
        m, n, cfg = parse_launch(text)
        lin = qtip_layer(m, n, 2)
        xh = torch.randn(args.batch, n, device=dev).half()
        y = torch.zeros(args.batch, m, device=dev)
        qt.decode_matmul(lin, xh, cfg, y)  # compile
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.reps):
            qt.decode_matmul(lin, xh, cfg, y)
        end.record()
        torch.cuda.synchronize()
        print(f"{m}x{n} {cfg}: {start.elapsed_time(end) * 1000 / args.reps:.2f} us", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
