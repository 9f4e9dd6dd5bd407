"""Split-K scratch shared by the launches on one device: float32 partial sums and int32 arrival
counters (a launch's last split to arrive sums the partials and sets its counter back to 0).

Grown when a launch needs more, never freed. A CUDA graph replays the addresses it captured, and
the engine captures its largest batch bucket first: had growth for a later bucket freed the buffers
an earlier graph holds, the allocator could hand them to other tensors, which that graph's replays
would then overwrite. Growth is refused during a capture, where the new counters' zeroing would
only be recorded, not run (the engine's warm-up before each capture makes every launch's need known).
"""

from __future__ import annotations

import torch

_CURRENT: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # outgrown, kept alive for the graphs that captured them
MIN_PARTIALS = 1 << 16
MIN_COUNTERS = 4096


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def split_workspace(device: torch.device, partials: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 buffer of ≥ `partials`, zeroed int32 counters ≥ `counters`) for launches on `device`."""
    key = str(device)
    ws, cnt = _CURRENT.get(key, (None, None))
    if ws is not None and ws.numel() >= partials and cnt.numel() >= counters:
        return ws, cnt
    if _capturing():
        raise RuntimeError(f"split-K workspace on {key} must grow to {partials} partials / {counters} counters "
                           "during a CUDA graph capture: run the launch once before capturing it")
    if ws is not None:
        _RETIRED.append((ws, cnt))
    ws = torch.empty(max(partials, MIN_PARTIALS, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
    cnt = torch.zeros(max(counters, MIN_COUNTERS, 0 if cnt is None else cnt.numel()), dtype=torch.int32,
                      device=device)
    _CURRENT[key] = (ws, cnt)
    return ws, cnt
