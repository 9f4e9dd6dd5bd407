"""Sweep of the QTIP fragment kernel's launch shapes, kernel alone, against its own fixed cost:

    python -m benchmarks.qtip_frag_sweep

For QTIP 2-bit at three Llama-2-7B projection shapes, batch 1: every (row tiles, warps, table
copies, split) of the sweep, timed with `tuning.cold_us` (CUDA-graph replays, cold L2), and — at
4096×4096 — the same launch with an empty loop (TN = 0: table build, epilogue and atomics only).
The last lines hold the best frag launch next to the flat kernel and cuBLAS fp16 of the same run.
"""

from __future__ import annotations

import torch
import triton

from benchmarks.kernels import qtip_layer
from lowbit.kernels import qtip_frag_triton as f
from lowbit.kernels import qtip_triton as qt
from lowbit.kernels.tuning import cold_us

LAUNCHES = ((4, 4, 32), (4, 8, 32), (2, 16, 32), (4, 4, 16), (4, 8, 16), (2, 8, 16), (2, 16, 16), (1, 16, 16))


def _launch(lin, xh, y, rt, nw, rep, split, empty=False):
    m, n = lin.out_features, lin.in_features
    tm, tn = m // 16, n // 16
    per = triton.cdiv(triton.cdiv(tn, split), nw) * nw
    grid = (triton.cdiv(tm, rt), triton.cdiv(tn, per))
    return lambda: f._hyb_frag_kernel[grid](
        xh.view(torch.int32), lin.codes.view(torch.int32), qt._lut32(lin), y, tm, 0 if empty else tn, 1, n // 2,
        m, per, K=2, RT=rt, NB=1, NW=nw, REP=rep, ATOMIC=True, EMULATE=False, num_warps=nw, num_stages=1)


def _flat(lin, xf, y, split):
    cfg = qt.QTIPConfig("flat", 16, 256, 1, split)
    return lambda: qt.decode_matmul(lin, xf, cfg, y)


def _fp16(xh, m, n):
    w16 = torch.empty(n, m, device=xh.device, dtype=torch.float16)
    return lambda: torch.matmul(xh, w16)


def main() -> int:
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} triton {triton.__version__}")
    for m, n in ((4096, 4096), (11008, 4096), (4096, 11008)):
        lin = qtip_layer(m, n, 2)
        xh = torch.randn(1, n, device=dev).half()
        y = torch.zeros(1, m, device=dev)
        runs = []
        for rt, nw, rep in LAUNCHES:
            for split in (1, 2, 4):
                us = cold_us(_launch(lin, xh, y, rt, nw, rep, split), dev)
                runs.append((round(us, 2), f"RT={rt} NW={nw} copies={rep} split={split}"))
                if m == n:
                    fixed = cold_us(_launch(lin, xh, y, rt, nw, rep, split, empty=True), dev)
                    print(f"{m}x{n} {runs[-1][1]}: {us:.2f} us (empty loop {fixed:.2f} us)", flush=True)
        flat = min(cold_us(_flat(lin, xh.float(), y, s), dev) for s in (2, 4))
        fp16 = cold_us(_fp16(xh, m, n), dev)
        best = min(runs)
        print(f"{m}x{n}: best frag {best[0]:.2f} us ({best[1]}) | flat {flat:.2f} us | "
              f"cuBLAS fp16 {fp16:.2f} us", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
