"""Programmatic dependent launch (Hopper and later): a kernel starts while the one before it ends.

Why: a batch-1 decode step is ~20 kernels a layer, most a few µs long, and even replayed from a
CUDA graph each waits for the previous grid to drain before its first program is placed, then
spends its first microseconds fetching what it needs. Launched with Triton's `launch_pdl`, a
grid's programs are placed as soon as every program of the running grid has passed
`griddepcontrol.launch_dependents`, and run up to `griddepcontrol.wait`, which returns once the
previous grid has finished and its writes are visible. What a kernel reads from the weights
(code words, tables, sign vectors) can be fetched before that wait.

Every kernel launched this way keeps two rules (`wait_prior` does both):
- before the wait it touches no activation memory (nothing the previous kernel reads or writes,
  nor a buffer the allocator handed over from an earlier kernel);
- it lets its dependents start only after its own wait, so a grid that starts early overlaps only
  the kernel just before it, which itself waited for everything before.
A kernel launched without the attribute follows the usual stream order, so mixing with torch's
own kernels is safe. LOWBIT_PDL=0 turns it off (for A/B timing).

Only launches for up to LOWBIT_PDL_MAX_ROWS (default 8) rows of activations take it: at batch 1 it
paid (fifth session), at 16, 32 and 64 rows a QTIP-2 decode step ran 1.3%, 8% and 3.4% slower with
it (`benchmarks/pdl_ab.py`, RESULTS.md eleventh session) — grids that start early hold SM slots
the running grid's later programs want once the kernels are long enough to fill the GPU.
"""

from __future__ import annotations

import functools
import os

import torch

from .tuning import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    wait_prior = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - a Triton without NVIDIA's grid-dependency ops: PDL stays off
    gdc_wait = gdc_launch_dependents = None


@functools.cache
def _capability(index: int) -> int:
    major, _ = torch.cuda.get_device_capability(index)
    return major


def takes_rows(rows: int | None) -> bool:
    """Whether a launch serving `rows` rows of activations takes PDL (None: a launch not sized by
    rows, such as a weight decode)."""
    return rows is None or rows <= int(os.environ.get("LOWBIT_PDL_MAX_ROWS", "8"))


def enabled(t: torch.Tensor, rows: int | None = None) -> bool:
    """PDL applies to a launch on t's device for `rows` rows: a CUDA device of compute capability
    ≥ 9, compiled kernels (not the interpreter), not switched off with LOWBIT_PDL=0, `takes_rows`."""
    return (t.is_cuda and gdc_wait is not None and not interpreting() and os.environ.get("LOWBIT_PDL", "1") != "0"
            and takes_rows(rows)
            and _capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) >= 9)


def launch_options(t: torch.Tensor, rows: int | None) -> dict:
    """Keyword arguments for a launch of a kernel taking `PDL: tl.constexpr` on t's device for
    `rows` rows of activations: the kernel's flag and Triton's launch attribute always together
    (an attributed launch without the wait would read the previous kernel's output before it is
    written)."""
    return {"PDL": True, "launch_pdl": True} if enabled(t, rows) else {"PDL": False}


if triton is not None:

    @triton.jit
    def wait_prior(PDL: tl.constexpr):
        """Wait for the previous kernel's results, then let the next kernel's programs start."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
