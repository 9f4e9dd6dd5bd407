"""The tuner front shared by the fused kernels: picks are cached in-process and on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lowbit.kernels import tuning


@dataclass(frozen=True)
class Cfg:
    kind: str
    split_k: int = 1


def test_batch_buckets():
    assert [tuning.batch_bucket(b) for b in (1, 2, 3, 5, 16, 17, 64, 65, 128, 129, 1000, 2048, 2049, 9000)] == [
        1, 2, 4, 8, 16, 32, 64, 128, 128, 256, 1024, 2048, 4096, 4096]


@pytest.fixture
def timing_cache(tmp_path, monkeypatch):
    """An empty on-disk pick cache in tmp_path, nothing loaded yet, timing allowed (as on a GPU)."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_DISK", None)
    monkeypatch.setattr(tuning, "autotune_enabled", lambda x: True)


def test_picks_persist_across_processes(timing_cache, monkeypatch):
    x = torch.zeros(2, 8)
    tuned = []

    def tune():
        tuned.append(1)
        return Cfg("gemv", 4)

    key = ("layer", 4096, 4096, 2)
    cache: dict = {}
    assert tuning.choose(cache, key, x, tune, lambda: Cfg("heuristic"), Cfg) == Cfg("gemv", 4)
    saved = json.loads(tuning.tuned_file().read_text())
    assert list(saved.values()) == [{"kind": "gemv", "split_k": 4}] and "triton" in next(iter(saved))
    # a new process: nothing in memory, the saved pick is used without tuning
    monkeypatch.setattr(tuning, "_DISK", None)
    assert tuning.choose({}, key, x, tune, lambda: Cfg("heuristic"), Cfg) == Cfg("gemv", 4) and len(tuned) == 1
    # without timing (CPU, inside a graph capture) the heuristic is used and nothing is saved
    monkeypatch.setattr(tuning, "autotune_enabled", lambda x: False)
    assert tuning.choose({}, ("other",), x, tune, lambda: Cfg("heuristic"), Cfg) == Cfg("heuristic")
    assert len(json.loads(tuning.tuned_file().read_text())) == 1


def test_unreadable_or_stale_cache_means_tuning_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    tuning.tuned_file().write_text("{not json")
    monkeypatch.setattr(tuning, "_DISK", None)
    assert tuning.load_pick(("k",), torch.device("cpu"), Cfg) is None
    tuning.save_pick(("k",), torch.device("cpu"), Cfg("mma"))
    monkeypatch.setattr(tuning, "_DISK", None)
    assert tuning.load_pick(("k",), torch.device("cpu"), Cfg) == Cfg("mma")

    @dataclass(frozen=True)
    class Renamed:
        other: int = 0

    assert tuning.load_pick(("k",), torch.device("cpu"), Renamed) is None


def test_a_pick_made_among_other_candidates_is_tuned_again(timing_cache, monkeypatch):
    """A lowbit with new kernels or launch shapes must not reuse a pick made without them."""
    x = torch.zeros(16, 8)
    tuned = []

    def tune(pick):
        return lambda: tuned.append(pick) or pick

    old = [Cfg("mma", 1), Cfg("mma", 2)]
    new = old + [Cfg("frag", 4)]
    key = ("layer", 4096, 4096, 16)
    assert tuning.choose({}, key, x, tune(Cfg("mma", 2)), lambda: Cfg("h"), Cfg, lambda: old) == Cfg("mma", 2)
    monkeypatch.setattr(tuning, "_DISK", None)  # a new process, same candidates: the saved pick
    assert tuning.choose({}, key, x, tune(Cfg("x")), lambda: Cfg("h"), Cfg, lambda: list(old)) == Cfg("mma", 2)
    monkeypatch.setattr(tuning, "_DISK", None)  # a new process with a frag candidate: tuned again
    assert tuning.choose({}, key, x, tune(Cfg("frag", 4)), lambda: Cfg("h"), Cfg, lambda: new) == Cfg("frag", 4)
    assert tuned == [Cfg("mma", 2), Cfg("frag", 4)]
    assert len(json.loads(tuning.tuned_file().read_text())) == 2


def test_a_pick_made_with_other_kernel_code_is_tuned_again(timing_cache, monkeypatch):
    """Same candidates, changed kernel source (a faster kernel under the same launch name): tuned again."""
    x = torch.zeros(16, 8)
    cands = [Cfg("frag"), Cfg("dequant")]
    key = ("layer", 4096, 4096, 1024)
    assert tuning.choose({}, key, x, lambda: Cfg("frag"), lambda: Cfg("h"), Cfg, lambda: cands) == Cfg("frag")
    assert f"kernels {tuning.kernels_digest()} |" in next(iter(json.loads(tuning.tuned_file().read_text())))
    monkeypatch.setattr(tuning, "_DISK", None)  # a new process, same kernels: the saved pick
    assert tuning.choose({}, key, x, lambda: Cfg("x"), lambda: Cfg("h"), Cfg, lambda: cands) == Cfg("frag")
    monkeypatch.setattr(tuning, "_DISK", None)  # a new process whose kernel files differ
    monkeypatch.setattr(tuning, "kernels_digest", lambda: "0123456789ab")
    assert tuning.choose({}, key, x, lambda: Cfg("dequant"), lambda: Cfg("h"), Cfg, lambda: cands) == Cfg("dequant")


def test_the_kernels_digest_follows_their_source_files(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNELS_DIGEST", raising=False)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    first = tuning.sources_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("not a source file")
    assert tuning.sources_digest(tmp_path) == first and len(first) == 12
    (tmp_path / "b.py").write_text("y = 3\n")
    assert tuning.sources_digest(tmp_path) != first
    assert tuning.kernels_digest() == tuning.sources_digest(Path(tuning.__file__).parent)


def test_a_pinned_kernels_digest_keeps_the_picks_of_other_kernel_code(timing_cache, monkeypatch):
    """LOWBIT_KERNELS_DIGEST (A/B trees that differ in one kernel): a pick saved under the pinned
    digest is reused whatever the source files hold."""
    x = torch.zeros(16, 8)
    cands = [Cfg("frag"), Cfg("dequant")]
    key = ("layer", 4096, 4096, 1)
    monkeypatch.setenv("LOWBIT_KERNELS_DIGEST", "ee2adffdd779")
    assert tuning.kernels_digest() == "ee2adffdd779"
    assert tuning.choose({}, key, x, lambda: Cfg("frag"), lambda: Cfg("h"), Cfg, lambda: cands) == Cfg("frag")
    monkeypatch.setattr(tuning, "_DISK", None)  # a new process of a tree with other kernel files
    monkeypatch.setattr(tuning, "_own_digest", lambda: "0123456789ab")
    assert tuning.choose({}, key, x, lambda: Cfg("dequant"), lambda: Cfg("h"), Cfg, lambda: cands) == Cfg("frag")
    monkeypatch.delenv("LOWBIT_KERNELS_DIGEST")
    monkeypatch.setattr(tuning, "_DISK", None)  # unpinned, the same tree: its own digest, tuned again
    assert tuning.choose({}, key, x, lambda: Cfg("dequant"), lambda: Cfg("h"), Cfg, lambda: cands) == Cfg("dequant")
