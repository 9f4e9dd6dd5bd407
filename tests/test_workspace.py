"""The split-K scratch shared by the uniform and VPTQ launches (`lowbit.kernels.workspace`)."""

import gc
import weakref

import pytest
import torch

from lowbit.kernels import workspace


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(workspace, "_CURRENT", {})
    monkeypatch.setattr(workspace, "_RETIRED", [])


def test_workspace_grows_without_freeing_what_a_graph_may_hold(fresh):
    """A buffer once handed out stays alive after the workspace outgrows it (a CUDA graph captured
    with it replays its address); sizes only grow, and new counters start at zero."""
    dev = torch.device("cpu")
    ws, cnt = workspace.split_workspace(dev, 10, 10)
    assert ws.numel() == workspace.MIN_PARTIALS and cnt.numel() == workspace.MIN_COUNTERS
    assert workspace.split_workspace(dev, 100, 100)[0] is ws  # fits: the same buffers
    refs = weakref.ref(ws), weakref.ref(cnt)
    cnt[3] = 7  # a launch's counter, as a graph would leave it (0 after every launch; any value here)
    del ws, cnt
    ws2, cnt2 = workspace.split_workspace(dev, 3 * workspace.MIN_PARTIALS, 10)
    gc.collect()
    assert all(r() is not None for r in refs), "an outgrown buffer was freed"
    assert ws2.numel() == 3 * workspace.MIN_PARTIALS and cnt2.numel() == workspace.MIN_COUNTERS
    assert not cnt2.any()
    ws3, cnt3 = workspace.split_workspace(dev, 10, 2 * workspace.MIN_COUNTERS)
    assert ws3.numel() == 3 * workspace.MIN_PARTIALS and cnt3.numel() == 2 * workspace.MIN_COUNTERS  # never shrinks


def test_workspace_refuses_to_grow_inside_a_graph_capture(fresh, monkeypatch):
    """Inside a capture the counters' zeroing would only be recorded: growing there is an error
    that says what to do; what already fits is handed out."""
    dev = torch.device("cpu")
    ws, _ = workspace.split_workspace(dev, 10, 10)
    monkeypatch.setattr(workspace, "_capturing", lambda: True)
    assert workspace.split_workspace(dev, 10, 10)[0] is ws
    with pytest.raises(RuntimeError, match="during a CUDA graph capture: run the launch once before"):
        workspace.split_workspace(dev, 2 * workspace.MIN_PARTIALS, 10)
