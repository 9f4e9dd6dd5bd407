"""The scheduler's prefill coalescing: when waiting prompts join the running batch."""

import pytest
import torch

from lowbit.config import EngineConfig
from lowbit.engine import Engine
from lowbit.engine.kv_cache import KVCache
from lowbit.engine.request import Sequence
from lowbit.engine.scheduler import Scheduler


def seq(prompt_len: int = 5) -> Sequence:
    return Sequence(request=None, index=0, tokens=list(range(prompt_len)), prompt_len=prompt_len, seed=0, detok=None)


def run_step(s: Scheduler) -> list[tuple[Sequence, int]]:
    """schedule(), then what the engine does after executing: count the computed tokens and
    append a sampled token to each sequence that finished its prompt."""
    batch = s.schedule()
    for q, n in batch:
        q.num_computed += n
        if q.remaining == 0:
            q.tokens.append(0)
    return batch


def make(wait: int = 0, min_waiting: int | None = None, max_seqs: int = 16) -> Scheduler:
    cache = KVCache(1, 64, 16, 1, 8, "cpu", torch.float32)
    cfg = EngineConfig(max_num_seqs=max_seqs, prefill_wait_steps=wait, prefill_min_waiting=min_waiting)
    return Scheduler(cache, cfg)


def decoding(s: Scheduler, n: int) -> list[Sequence]:
    seqs = [seq() for _ in range(n)]
    for q in seqs:
        s.add(q)
    run_step(s)  # an idle scheduler admits at once: all prefill in this one step
    assert all(q.remaining == 1 for q in seqs) and len(s.running) == n
    return seqs


def admitted_after(s: Scheduler, new: Sequence, limit: int = 20) -> int:
    for steps in range(limit):
        if any(q is new for q, _ in run_step(s)):
            return steps
    raise AssertionError("never admitted")


def test_without_waiting_a_prompt_joins_the_next_step():
    s = make(wait=0, min_waiting=4)
    decoding(s, 6)
    s.add(new := seq())
    assert admitted_after(s, new) == 0


def test_a_lone_prompt_waits_the_set_number_of_steps_then_joins():
    s = make(wait=3, min_waiting=4)
    decoding(s, 6)
    s.add(new := seq())
    assert admitted_after(s, new) == 3
    assert s.held_steps == 0
    s.add(again := seq())  # the count starts afresh for the next prompt
    assert admitted_after(s, again) == 3


def test_enough_waiting_prompts_are_admitted_together_at_once():
    s = make(wait=10, min_waiting=3)
    decoding(s, 6)
    first = seq()
    s.add(first)
    run_step(s)
    run_step(s)
    assert first not in s.running
    rest = [seq(), seq()]
    for q in rest:
        s.add(q)
    batch = run_step(s)
    assert {id(q) for q, _ in batch} >= {id(first), *map(id, rest)}
    assert [n for q, n in batch if q in rest] == [5, 5]


def test_an_idle_engine_and_low_load_admit_at_once():
    s = make(wait=10, min_waiting=4)
    s.add(a := seq())
    assert admitted_after(s, a) == 0  # nothing running
    s.add(b := seq())  # one running + one waiting <= min_waiting
    assert admitted_after(s, b) == 0


def test_a_step_that_carries_a_prompt_chunk_takes_waiting_prompts():
    s = make(wait=0, min_waiting=8)
    decoding(s, 6)
    s.max_tokens = 16
    s.add(long := seq(20))
    run_step(s)  # 6 decodes + 10 of its 20 prompt tokens
    assert long.remaining == 10
    s.wait_steps, s.max_tokens = 10, 30
    s.add(c := seq())
    batch = run_step(s)  # the step runs eagerly anyway: c joins it
    assert [n for q, n in batch if q is c] == [5]


def test_engine_takes_the_settings(smollm2):
    e = Engine(EngineConfig(kv_cache_blocks=8), model=smollm2)
    assert (e.scheduler.wait_steps, e.scheduler.min_waiting) == (EngineConfig.prefill_wait_steps, 64 // 8)
    e = Engine(EngineConfig(kv_cache_blocks=8, prefill_wait_steps=0, prefill_min_waiting=3), model=smollm2)
    assert (e.scheduler.wait_steps, e.scheduler.min_waiting) == (0, 3)


@pytest.mark.parametrize("field,value", [("prefill_wait_steps", -1), ("prefill_min_waiting", 0)])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
