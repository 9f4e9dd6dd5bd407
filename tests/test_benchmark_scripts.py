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


def test_engine_streams_times_decode_and_mixed_steps_per_setting(capsys, tmp_path):
    import json

    from benchmarks import engine_streams

    out_json = tmp_path / "rows.json"
    assert engine_streams.main(["--models", "random:tiny:fp16,random:tiny:qtip2", "--device", "cpu", "--streams", "4",
                                "--seconds", "60", "--warmup", "0.5", "--max-steps", "30", "--prompt-tokens", "6-10",
                                "--output-tokens", "3-5", "--prefill-wait", "0,3", "--prefill-min-waiting", "3", "--kv-cache-blocks", "32",
                                "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    assert [(r["model"], r["prefill_wait"]) for r in rows] == [
        ("random:tiny:fp16", 0), ("random:tiny:fp16", 3), ("random:tiny:qtip2", 0), ("random:tiny:qtip2", 3)]
    for r in rows:
        assert r["decode_steps"] + r["mixed_steps"] == 30 and r["mixed_steps"] >= 1 and r["decode_steps"] >= 1
        assert r["output_tok_s"] > 0 and r["ttft_ms"]["n"] >= 4 and r["itl_ms"]["p50"] > 0
    # Outputs of 3-5 tokens: each 4-stream round of prompts arrives within a few steps, and waiting
    # lets them share prefill steps.
    assert rows[1]["mixed_steps"] < rows[0]["mixed_steps"] and rows[3]["mixed_steps"] < rows[2]["mixed_steps"]
    assert all(not r["mixed_graphs"] for r in rows)  # no CUDA: every mixed step eager
    assert "| random:tiny:qtip2 | off | 3 |" in capsys.readouterr().out


def test_serve_compare_runs_each_model_per_server_flag_set(tmp_path, capsys):
    import json

    from benchmarks import serve_compare

    rc = serve_compare.main(["--models", "random:tiny:fp16", "--clients", "2", "--duration", "2", "--warmup", "1",
                             "--prompt-tokens", "4-8", "--output-tokens", "4-8", "--out", str(tmp_path),
                             "--server-args", "--device cpu --gil-switch-interval-ms 5; --device cpu"])
    rows = json.loads((tmp_path / "serve_compare.json").read_text())
    assert rc == 0 and [r["model"] for r in rows] == ["random:tiny:fp16 --device cpu --gil-switch-interval-ms 5",
                                                      "random:tiny:fp16 --device cpu"]
    assert all(r["requests"]["ok"] > 0 and r["passed"] for r in rows)
    assert "gil-switch-interval-ms 5" in capsys.readouterr().out
    assert len(list(tmp_path.glob("warmup_*.json"))) == 2  # one unreported warm-up run a server


def _sass(scenario: str, shape: str, config: str, *extra: str) -> tuple[str, dict]:
    """`benchmarks.sass` run as a user runs it (compiled, not interpreted): its output and the
    instruction counts it printed (main loop or whole kernel)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")  # the suite interprets
    run = subprocess.run([sys.executable, "-m", "benchmarks.sass", scenario, "--shape", shape, "--config", config, *extra],
                         capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-2000:]
    counts = re.split(r"(?:main loop|whole kernel(?: \(no loop\))?):", run.stdout)[-1]
    return run.stdout, {k: int(v) for k, v in re.findall(r"([A-Z][A-Z0-9_.]*) (\d+)", counts)}


def test_sass_main_loop_is_the_longest_backward_branch_or_none():
    """The counted loop lies between the longest backward branch's target and source; a kernel the
    compiler unrolled whole has none, and then the whole kernel is counted (and said so)."""
    from benchmarks import sass

    code = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/              @P0 BRA 0x10 ;
        /*0040*/                   HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0050*/                   BRA 0x40 ;
        /*0060*/                   EXIT ;
    """
    assert sass.main_loop_span(code) == (0x10, 0x30)
    assert sass.main_loop_span(code, "first") == (0x10, 0x30)
    assert sass.main_loop_counts(code) == {"LDG.E": 1, "FFMA": 1, "BRA": 1}
    flat = code.replace("@P0 BRA 0x10", "NOP").replace("BRA 0x40", "NOP")
    assert sass.main_loop_span(flat) is None and sum(sass.main_loop_counts(flat).values()) == 7


def test_sass_report_compiles_a_recorded_launch_for_sm90_without_a_gpu():
    """The launch is recorded, not run (CPU tensors), compiled for sm_90, and its main loop counted:
    the int4 GEMV's loop holds its 16-byte code loads and one FFMA a weight's partial product."""
    out, loop = _sass("uniform-gemv", "256x256", "32,16,4,1")
    regs = re.search(r"_uq_gemv_kernel grid \(1, 2, 1\): (\d+) registers, 0 B local", out)
    assert regs and 24 <= int(regs.group(1)) <= 255, out
    assert loop.get("LDG.E.128", 0) >= 1 and loop.get("FFMA", 0) >= 64, out
    # a register cap in the config (UQConfig.max_registers) reaches ptxas
    out, _ = _sass("uniform-gemv", "256x256", "32,16,4,1,64")
    assert re.search(r"_uq_gemv_kernel grid \(1, 2, 1\): (?:[0-5]\d|6[0-4]) registers", out), out
    # the int4 tensor-core kernel's hand-written PTX (decode, mma) assembles for sm_90: HMMA in its loop
    out, loop = _sass("uniform-frag", "64x1024", "1,4,2")
    assert re.search(r"_uq_frag_kernel grid \(4,\): \d+ registers, 0 B local", out), out
    assert loop.get("HMMA", 0) >= 4 and loop.get("HFMA2", 0) >= 8, out
    # the VPTQ lookup-GEMV (Triton's two-stage pipeline): 16-byte codebook gathers and 8 FFMAs each in its loop
    out, loop = _sass("vptq-gemv", "256x512", "8,64,2,4,2")
    assert re.search(r"_vq_gemv_kernel grid \(1, 4, 2\): \d+ registers, 0 B local", out), out
    assert loop.get("LDG.E.128", 0) >= 4 and loop.get("FFMA", 0) == 8 * loop["LDG.E.128"], out
    # the q|k|v output transform with the rotary step stores whole rows (16-byte stores, q and the
    # caches), not half rows of 2-byte stores
    out, ops = _sass("hadamard", "12288x1", "1")
    assert "_hadamard_kernel grid (1, 1, 8)" in out and "whole kernel:" in out, out
    assert ops.get("STG.E.128", 0) >= 3 and "STG.E.U16" not in ops, out  # every store class is listed
    # decode attention compiled as a PDL launch: the early variant fetches its first tile's K and V
    # (16 KiB each, 8 16-byte loads a thread of each) before the wait; the plain one nothing
    out, _ = _sass("attention", "4096x128", "1", "--pdl")
    early = re.search(r"_paged_decode_kernel grid \(1, 32, \d+\): .* (\d+) global loads before the wait", out)
    assert early and int(early.group(1)) >= 16, out
    out, _ = _sass("attention", "4096x128", "0", "--pdl")
    assert re.search(r"_paged_decode_kernel grid .* 0 global loads before the wait", out), out


def test_replay_profile_ablations_replace_the_functions_the_decode_graph_calls():
    """Each `--ablate` patch must reach the call site the captured graph runs; a patch of a module
    the caller imported by name from leaves the launches in place (the attention row read 0 saved)."""
    import importlib
    from unittest import mock

    from benchmarks import replay_profile
    from lowbit.engine.cuda_graphs import GraphDecodeContext
    from lowbit.kernels import qtip_triton

    callers = {"attention": GraphDecodeContext.attend.__globals__, "hadamard": vars(qtip_triton),
               "frag": vars(qtip_triton)}
    for name, (target, fake) in replay_profile.ABLATIONS.items():
        module, attr = target.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), attr), target
        with mock.patch(target, fake):
            assert callers[name][attr] is fake, f"{name}: the decode path does not call {target}"


def test_replay_timeline_cuts_one_layer_at_its_attention_launches():
    """`--timeline L` lists layer L's cycle: from its attention launch up to the next layer's, whatever
    the embedding launched before the first layer; a layer past the last full cycle is an error."""
    from types import SimpleNamespace

    import pytest

    from benchmarks import replay_profile

    names = ["embed", "norm"] + ["_paged_decode_kernel", "_hadamard_kernel", "_hyb_frag_kernel"] * 3 + ["head"]
    step = [SimpleNamespace(name=n) for n in names]
    assert [e.name for e in replay_profile.layer_launches(step, 1)] == ["_paged_decode_kernel", "_hadamard_kernel",
                                                                         "_hyb_frag_kernel"]
    assert replay_profile.layer_launches(step, 1)[0] is step[5]
    with pytest.raises(ValueError, match="3 paged-attention launches"):
        replay_profile.layer_launches(step, 2)


def test_replay_timeline_shares_add_up_to_the_critical_path(capsys):
    """Overlapping launches: each launch's share is how far it moves the latest end (the previous
    layer's last launch counted), so the shares sum to the last end minus that launch's end."""
    from types import SimpleNamespace

    from benchmarks import replay_profile

    def ev(name, start, end):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))

    step = [ev("qkv", 90.0, 104.0), ev("_paged_decode_kernel", 100.0, 110.0), ev("merge", 105.0, 112.0),
            ev("gemv", 108.0, 111.0), ev("_paged_decode_kernel", 180.0, 190.0)]
    replay_profile.print_layer_timeline(step, 0)
    out = capsys.readouterr().out
    assert "the launch before it ends at 4.0 us" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [float(r[4]) for r in rows] == [6.0, 2.0, 0.0]
    assert "next layer's attention starts at 80.0 us" in out


def test_replay_knob_captures_each_setting_and_times_them_in_turn(monkeypatch, capsys):
    """`--knob VAR`: each graph is captured with VAR set to its setting (read while the launches are
    recorded), the two are timed alternately, and the table gives each setting's median."""
    import os

    from benchmarks import replay_profile

    captured, order = [], []
    monkeypatch.delenv("LOWBIT_X", raising=False)

    def fake_decoder(model, context, batch, capacity):
        captured.append((os.environ.get("LOWBIT_X"), context, capacity))
        return object(), os.environ["LOWBIT_X"]

    def fake_replay(graph, steps):
        order.append(graph)
        return {"0": 2.0, "1": 1.5}[graph] + 0.01 * len(order)

    monkeypatch.setattr(replay_profile, "_decoder", fake_decoder)
    monkeypatch.setattr(replay_profile, "_replay_ms", fake_replay)
    assert replay_profile.knob_ab(None, 1000, "LOWBIT_X", capacity=4096, rounds=3) == 0
    assert captured == [("0", 1000, 4096), ("1", 1000, 4096)] and "LOWBIT_X" not in os.environ
    assert order == ["0", "1"] * 3
    out = capsys.readouterr().out
    assert "| 0 | 2.030 |" in out and "| 1 | 1.540 |" in out  # medians: the second round of each


def test_kernel_benchmark_int4_rows_time_the_tensor_core_kernel_on_its_own_layout(monkeypatch):
    """The kernel matrix's int4 rows (and `uniform_frag_ab`) time the tensor-core kernel on the
    layer's fragment layout beside the packed layer's CUDA-core kernels: both give the layer's
    product (the interpreter standing in for the GPU); the fragment layout's candidates are the ones a
    model's layer tunes (the kernel for fp16, in 64-row chunks past 64 rows; its own decode + cuBLAS,
    kind "frag-dequant", from 16 rows or for other dtypes); every weight copy of the rotation holds
    both layouts of its own (one shared between them would be read hot from L2 every call)."""
    import torch

    from benchmarks import kernels_uv
    from lowbit.kernels import tuning
    from lowbit.kernels import uniform_triton as uq

    g = torch.Generator().manual_seed(0)
    scales = (torch.rand(2, 32, generator=g) * 0.02 + 0.002).half()
    p = uq.pack_uniform(torch.randint(0, 16, (32, 256), generator=g), 4, scales,
                        torch.randint(0, 16, (2, 32), generator=g).half(), 128)
    case = kernels_uv.uniform_case(p)
    assert case.packed is p and case.frag is not None and (case.out_features, case.in_features) == (32, 256)
    kinds = lambda c, batch, dtype=torch.float16: {k.kind for k in kernels_uv.uniform_candidates(c, batch, dtype)}  # noqa: E731
    assert kinds(case, 1) == {"gemv", "frag"} and kinds(case, 64) == {"mma", "dequant", "frag", "frag-dequant"}
    assert kinds(case, 1000) == {"mma", "dequant", "frag", "frag-dequant"}  # the kernel in 64-row chunks
    assert kinds(case, 1, torch.bfloat16) == {"gemv", "frag-dequant"}  # the kernel takes fp16 only
    q4_1 = kernels_uv.uniform_case(uq.pack_uniform(torch.randint(0, 16, (32, 256), generator=g), 4, scales,
                                                   torch.randn(2, 32, generator=g).half(), 128, zero_is_min=True))
    assert q4_1.frag is None and kinds(q4_1, 1) == {"gemv"}

    x = torch.randn(2, 256, generator=g).half()
    ref = uq.uniform_packed_matmul_reference(x.double(), p)
    outs = []

    def time_two(run, cands, device):  # the tuner's timing, cut to one launch of each family
        picks = [next(c for c in cands if c.kind == kind) for kind in ("gemv", "frag")]
        outs.extend(run(c).double() for c in picks)
        return picks[1], [(c, 1.0, "") for c in picks]

    monkeypatch.setattr(tuning, "time_candidates", time_two)
    best, _ = kernels_uv.tune_uniform(x, case)
    outs.append(kernels_uv.run_uniform(x, case, None, best).double())
    assert best.kind == "frag" and len(outs) == 3
    outs.append(kernels_uv.run_uniform(x, case, None, uq.UQConfig(kernels_uv.FRAG_DEQUANT)).double())
    outs.append(kernels_uv.run_uniform(x.repeat(40, 1), case, None, uq.UQConfig("frag")).double()[-2:])  # 2 chunks
    assert all(float((y - ref).norm() / ref.norm()) < 2e-3 for y in outs)

    c = kernels_uv._clone_uniform(case)
    for copy, orig in ((c.packed.qweight, p.qweight), (c.packed.scales, p.scales), (c.packed.zeros, p.zeros),
                       (c.frag.codes, case.frag.codes), (c.frag.sz, case.frag.sz)):
        assert torch.equal(copy, orig) and copy.data_ptr() != orig.data_ptr()


def test_vptq_gather_baseline_sums_the_entries_its_indices_name():
    """`benchmarks.vptq_gather`'s bare gather kernel (the ceiling the VPTQ lookup-GEMV is held
    against) really gathers: its per-program sums add up to the sum of the named codebook rows,
    indices read as unsigned 16-bit, ragged last program masked; the sweep list holds the tuner's
    own candidates plus the pipelined and 8-warp variants of each."""
    import pytest
    import torch

    from benchmarks.kernels_uv import vptq_layer
    from tests.conftest import kernel_module

    if torch.cuda.is_available():
        pytest.skip("a CPU check (Triton's interpreter); the GPU run is the benchmark itself")
    vptq_gather = kernel_module("benchmarks.vptq_gather")

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(-(2**15), 2**15, (1000,), generator=g, dtype=torch.int16)
    tab = torch.randn(65536 * 8, generator=g).half()
    out = torch.full((4 * 8,), float("nan"))
    vptq_gather._gather_sum_kernel[(4,)](idx, tab, out, 1000, ITERS=2, BLOCK=128, V=8)
    ref = tab.view(65536, 8)[idx.long() & 0xFFFF].float().sum(0)
    assert torch.allclose(out.view(4, 8).sum(0), ref, atol=1e-4)

    p = vptq_layer(64, 256, device="cpu")
    base = vptq_gather.vq.candidate_configs(p, 1, torch.device("cpu"))
    sweep = vptq_gather.sweep_configs(p, torch.device("cpu"))
    assert sweep[: len(base)] == base and len(sweep) == 5 * len(base)
    assert {(c.num_stages, c.num_warps) for c in sweep} == {(1, 4), (2, 4), (3, 4), (1, 8), (3, 8)}
