"""The timing behind every fused kernel's tuner (QTIP, VPTQ, uniform).

A candidate is timed the way a decode step runs it: replayed from a CUDA graph (no host launch
gaps: a Python-launched three-kernel layer otherwise measures the host, tens of µs, not the GPU)
with the weights cold in L2 (a write larger than L2 between calls, whose own time, measured in a
graph of writes alone, is subtracted).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("lowbit")

_FLUSH: dict[torch.device, torch.Tensor] = {}


def interpreting() -> bool:
    """Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled(x: torch.Tensor) -> bool:
    """Timing is possible: a CUDA tensor, not the interpreter, not inside a graph capture, and
    not switched off with LOWBIT_AUTOTUNE=0 (then the heuristic choice is used)."""
    return (x.is_cuda and not interpreting()
            and not torch.cuda.is_current_stream_capturing() and os.environ.get("LOWBIT_AUTOTUNE", "1") != "0")


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer larger than L2, kept per device. Made outside inference mode whatever the caller's
    mode: an inference tensor could not be zeroed by a later tuning outside it."""
    if device not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        with torch.inference_mode(False):
            _FLUSH[device] = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device=device)
    return _FLUSH[device]


def graph_ms(fn: Callable[[], object], reps: int, replays: int) -> float:
    """Median ms of one replay of a graph holding `reps` calls of fn."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def cold_us(fn: Callable[[], object], device: torch.device, reps: int = 16, replays: int = 5) -> float:
    """µs per call of fn with L2 evicted before each call, replayed from a CUDA graph."""
    buf = _flush_buffer(device)

    def flushed():
        buf.zero_()
        fn()

    total = graph_ms(flushed, reps, replays)
    flush_only = graph_ms(buf.zero_, reps, replays)
    return max(total - flush_only, 0.0) * 1e3 / reps


def time_candidates(run: Callable[[object], object], cands: list, device: torch.device) -> tuple[object, list]:
    """(fastest config, [(config, µs, error)]) over `cands`, run(cfg) launching one candidate.
    A candidate that fails to compile or run (registers, shared memory) is skipped with its error."""
    timings = []
    for cfg in cands:
        try:
            run(cfg)  # compiles outside any capture
            timings.append((cfg, cold_us(lambda cfg=cfg: run(cfg), device), ""))
        except Exception as e:  # noqa: BLE001 - reported in the timings
            torch.cuda.synchronize()
            timings.append((cfg, float("inf"), repr(e)[:200]))
    ok = [t for t in timings if t[1] != float("inf")]
    if not ok:
        raise RuntimeError("no kernel configuration ran: " + "; ".join(f"{c}: {e}" for c, _, e in timings))
    return min(ok, key=lambda t: t[1])[0], timings


def batch_bucket(batch: int) -> int:
    """Batch sizes that share a tuned configuration: powers of two up to 2048, then one bucket.
    Prefill sizes need buckets of their own: with one bucket past 64 rows, the first row count a
    process tuned decided for all (a 128-token prompt picked the tensor-core decode for the o and
    down projections, which then ran every 1000-token prefill: 65 against 39 ms, RESULTS.md
    eleventh session)."""
    return 1 << max(0, batch - 1).bit_length() if batch <= 2048 else 4096


def tuned_file() -> Path:
    """Where picks persist across runs (a server start re-tunes nothing it has seen)."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "tuned_kernels.json"


_DISK: dict[str, dict] | None = None


def _disk() -> dict[str, dict]:
    global _DISK
    if _DISK is None:
        try:
            _DISK = json.loads(tuned_file().read_text())
        except (OSError, ValueError):
            _DISK = {}
    return _DISK


def kernels_digest() -> str:
    """A short fingerprint of the kernels' source files (this package's .py files). A pick made with
    other kernel code is stale even among the same candidates: the int4 fragment layout's Wᵀ decode
    got 2.8–3.8x faster under the same launch name, and a pick between it and the kernel in 64-row
    chunks made before would have kept the slower path (RESULTS.md, nineteenth session).
    LOWBIT_KERNELS_DIGEST pins it, for A/B timing of trees that differ in one kernel (an attention
    or transform change) with the same tuned picks: otherwise each tree re-tunes the decode
    kernels, which costs device time and lets the tuner's noise into the comparison."""
    return os.environ.get("LOWBIT_KERNELS_DIGEST") or _own_digest()


@functools.cache
def _own_digest() -> str:
    return sources_digest(Path(__file__).parent)


def sources_digest(folder: Path) -> str:
    """12 hex digits of the SHA-1 over the names and bytes of the .py files in folder, in name order."""
    h = hashlib.sha1()
    for f in sorted(folder.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def _disk_key(key: tuple, device: torch.device, among: str = "") -> str:
    """The pick is only valid for the same GPU model, Triton version, kernel code and candidate list
    (`among`, a digest: a lowbit with other kernels or launch shapes re-tunes instead of reusing a
    pick made without them)."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (f"{name} | triton {triton.__version__} | kernels {kernels_digest()} | {key!r}"
            + (f" | among {among}" if among else ""))


def digest(candidates: list) -> str:
    """A short fingerprint of a candidate list (for `among`)."""
    return hashlib.sha1(repr(candidates).encode()).hexdigest()[:12]


def load_pick(key: tuple, device: torch.device, cls: type, among: str = ""):
    entry = _disk().get(_disk_key(key, device, among))
    if entry is None:
        return None
    try:
        return cls(**entry)
    except TypeError:  # written by another version of the config class
        return None


def save_pick(key: tuple, device: torch.device, cfg, among: str = "") -> None:
    _disk()[_disk_key(key, device, among)] = dataclasses.asdict(cfg)
    path = tuned_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_disk(), indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home only costs re-tuning next time
        log.debug("could not save tuned kernel configs to %s: %s", path, e)


def choose(cache: dict, key: tuple, x: torch.Tensor, tune: Callable[[], object], heuristic: Callable[[], object],
           cls: type | None = None, candidates: Callable[[], list] | None = None):
    """The configuration for `key`: cached in this process, else saved by an earlier run (`cls`
    rebuilds it) that tuned among the same `candidates()`, else tune() where timing is possible
    (it caches its pick here; the pick is saved for later runs), else the heuristic's."""
    cfg = cache.get(key)
    if cfg is not None:
        return cfg
    if not autotune_enabled(x):
        return heuristic()
    among = digest(candidates()) if candidates is not None else ""
    if cls is not None:
        cfg = load_pick(key, x.device, cls, among)
        if cfg is not None:
            cache[key] = cfg
            return cfg
    cfg = tune()
    if cls is not None:
        save_pick(key, x.device, cfg, among)
    return cfg


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """x [..., n] -> (rows [B, n] with unit stride along n, the leading shape to restore)."""
    x2 = x.reshape(-1, x.shape[-1])
    return (x2 if x2.stride(-1) == 1 else x2.contiguous()), x.shape[:-1]
