"""The benchmark scripts a GPU session relies on run end to end on CPU at a tiny shape."""

from __future__ import annotations

import re

from benchmarks import profile_step


def test_profile_step_reports_prefill_and_decode_per_format(capsys):
    assert profile_step.main(["--shape", "tiny", "--formats", "fp16,qtip2", "--prompt", "16", "--steps", "2",
                              "--top", "3", "--host", "1"]) == 0
    out = capsys.readouterr().out
    for variant in ("fp16", "qtip2"):
        assert f"== {variant} prefill (16 tokens)" in out and f"== {variant} decode step" in out
    times = [float(t) for t in re.findall(r"operator time ([0-9.]+) ms", out)]
    assert len(times) == 4 and all(t > 0 for t in times)
    assert len(re.findall(r"^ +[0-9.]+ ms +[0-9.]+x  aten::", out, re.M)) == 12  # top 3 of each of the 4 runs
    for variant in ("fp16", "qtip2"):  # and the host side: the 3 Python functions with most own time
        assert f"== {variant} prefill host time (cProfile, 1 runs)" in out
    assert len(re.findall(r"^ +[0-9.]+ ms own +[0-9.]+ ms total", out, re.M)) == 6
