"""One QTIP / uniform layer forward with a fixed kernel configuration, for Nsight Compute:

    ncu --section SpeedOfLight --section WarpStateStats -k regex:_hyb_flat python -m benchmarks.profile_layer qtip2 4096 4096 1

It runs the layer a few times (the first compiles) so `ncu -c N` can pick a warm launch.
"""

from __future__ import annotations

import sys

import torch

from benchmarks import kernels_uv as uv
from benchmarks.kernels import qtip_layer


def main(argv=None) -> int:
    fmt, m, n, batch = (argv or sys.argv[1:])[:4]
    m, n, batch = int(m), int(n), int(batch)
    x = torch.randn(batch, n, device="cuda", dtype=torch.float16)
    if fmt.startswith("qtip"):
        from lowbit.kernels import qtip_triton as qt

        lin = qtip_layer(m, n, int(fmt[-1]))
        cfg = qt.heuristic_config(lin, batch, x.device)
        run = lambda: qt.run_config(lin, x, cfg)  # noqa: E731
    else:
        from lowbit.kernels import uniform_triton as uq

        p = uv.uniform_layer(m, n, int(fmt[-1]), 128)
        cfg = uq.heuristic_config(p, batch, x.device)
        run = lambda: uq.run_config(x, p, None, cfg)  # noqa: E731
    print(fmt, m, n, batch, cfg, flush=True)
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
