"""The randomized-Hadamard transforms of a QTIP decoder layer: butterfly kernel vs product kernel.

    python -m benchmarks.hadamard [--rows 1,16,64,1000] [--sweep]

Llama-2-7B's QTIP layer (qkv and gate-up fused) runs eight transforms: length 4096 five times (the
inputs of qkv, o and gate-up, the outputs of o and down), 12288 = 12·1024 (qkv out), 22016 = 172·128
(gate-up out) and 11008 = 172·64 (down in) once each. For each length and row count this times the launch `plan` picks, the butterfly kernel's
launch, and (`--sweep`) every product-kernel launch in `candidates`, each checked against
`hadamard_reference`; then a layer's total. The floor is the bytes (x read, y written) at the copy
bandwidth measured in the same run. Times are `tuning.cold_us` (graph replays, cold L2).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch
import triton

from lowbit.bench import copy_bandwidth
from lowbit.kernels import hadamard_triton as ht
from lowbit.kernels.hadamard import hadamard_factor, hadamard_reference
from lowbit.kernels.tuning import cold_us

# length, side, transforms like it in one decoder layer. Inputs: fp16 activations times SU's signs
# (H^T); outputs: the raw product, float32 from the decode kernels (up to 64 rows) or fp16 from
# cuBLAS (the dequant path beyond), times SV.
CALLS = ((4096, "in", 3), (4096, "out", 2), (12288, "out", 1), (22016, "out", 1), (11008, "in", 1))


def candidates(ch: int, rows: int = 1) -> list[dict]:
    """Product-kernel launches worth timing for a chunk of length ch and `rows` rows of x: one row
    a program, and from 16 rows also 2, 4 or 8 rows a program (L's tiles shared; fewer, longer
    programs)."""
    out = _one_row_candidates(ch)
    if rows >= 16:
        k = hadamard_factor(ch)
        for q in (32, 64, 128):
            m = ch // q
            if (ch // k) % q or m > 512 or m < 16:
                continue
            for br in (b for b in (2, 4, 8) if 4 * b <= rows):
                for ib in (32, 64):
                    for r_dot in (False, True):
                        for warps in (4, 8):
                            if ib * q * br <= 16384 and ib <= triton.next_power_of_2(m) and not (r_dot and q > 128):
                                out.append(ht.dot_plan(ch, q, ib, 32, r_dot, warps, br))
    return out


def _one_row_candidates(ch: int) -> list[dict]:
    k = hadamard_factor(ch)
    p = ch // k
    out = []
    for q in (16, 32, 64, 128, 256):
        m = ch // q
        if p % q or m > 512 or m < 16:
            continue
        for r_dot in (True, False):
            if r_dot and q > 128:
                continue
            for ib in (32, 64, 128):
                if ib > triton.next_power_of_2(m) or ib * q > 8192:
                    continue
                for bk in (16, 32):
                    if bk > triton.next_power_of_2(m):
                        continue
                    for warps in (4, 8) if ib < 128 else (8,):
                        out.append(ht.dot_plan(ch, q, ib, bk, r_dot, warps))
    return out


def _inputs(n: int, side: str, rows: int, dev):
    """x, the side's scale vector (SU signs in, SV out), out buffer."""
    g = torch.Generator(device=dev).manual_seed(n + rows)
    dtype = torch.float32 if side == "out" and rows <= 64 else torch.float16
    x = torch.randn(rows, n, device=dev, generator=g).to(dtype)
    if side == "in":
        scale = torch.randint(0, 2, (n,), device=dev, generator=g).half() * 2 - 1
    else:
        scale = (1 + 0.1 * torch.randn(n, device=dev, generator=g)) / 64
    return x, scale, torch.empty(rows, n, device=dev, dtype=torch.float16)


def _run(side: str, x, scale, out, launch):
    if side == "in":
        return ht.hadamard_transform(x, transpose=True, pre=scale, alpha=1 / 32, out=out, launch=launch,
                                     pre_signs=True)
    return ht.hadamard_transform(x, post=scale, alpha=32.0, out=out, launch=launch)


def _error(side: str, x, scale, out, launch) -> float:
    _run(side, x, scale, out, launch)
    if side == "in":
        ref = hadamard_reference(x.double() * scale.double(), transpose=True) / 32
    else:
        ref = hadamard_reference(x.double()) * 32 * scale.double()
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _compile(job) -> None:
    """Compile (and run once) a launch in a worker process; the Triton disk cache keeps it."""
    n, side, rows, launch = job
    dev = torch.device("cuda")
    try:
        _run(side, *_inputs(n, side, rows, dev), launch)
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001, S110 - the timing pass meets the same error and reports it
        pass


def _name(launch: dict) -> str:
    if launch["kernel"] == "dot":
        return (f"dot q{launch['Q']} ib{launch['IB']} bk{launch['BK']} br{launch['BR']} "
                f"{'Rdot' if launch['R_DOT'] else 'Rbfly'} w{launch['num_warps']}")
    return f"butterfly P1={launch['P1']} BR={launch['BR']} IB={launch['IB']} w{launch['num_warps']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,16,64,1000")
    ap.add_argument("--sweep", action="store_true", help="time every product-kernel launch in `candidates`")
    ap.add_argument("--jobs", type=int, default=12, help="processes compiling the sweep's kernels")
    ap.add_argument("--lengths", default="", help="only these transform lengths (e.g. 11008,12288,22016)")
    ap.add_argument("--match", default="", help="sweep only launches whose name holds one of these "
                    "comma-separated strings (e.g. 'br1 Rbfly,q64 ib64')")
    args = ap.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    jobs = {}
    calls = [c for c in CALLS if not args.lengths or str(c[0]) in args.lengths.split(",")]
    for n, side, _ in calls:
        for rows in rows_list:
            swept = candidates(n, rows) if args.sweep else []
            if args.match:
                swept = [la for la in swept if any(m in _name(la) for m in args.match.split(","))]
            launches = [ht.plan(n, rows), ht._butterfly_plan(n, rows)] + swept
            jobs[(n, side, rows)] = list({_name(launch): launch for launch in launches}.values())
    if args.sweep and args.jobs > 1:  # one job per kernel specialization (dtype, side, launch)
        todo = {(n, side, rows > 64, _name(la)): (n, side, rows, la) for (n, side, rows), ls in jobs.items() for la in ls}
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_compile, todo.values()))
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}, "
          f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| length | side | rows | picked µs | butterfly µs | best µs | floor µs | best launch | picked launch | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    layer = {r: [0.0, 0.0, 0.0] for r in rows_list}
    for n, side, count in calls:
        for rows in rows_list:
            x, scale, out = _inputs(n, side, rows, dev)
            times = []
            for launch in jobs[(n, side, rows)]:
                try:
                    err = _error(side, x, scale, out, launch)
                    us = cold_us(functools.partial(_run, side, x, scale, out, launch), dev)
                except Exception as e:  # noqa: BLE001 - a launch that does not fit is skipped
                    torch.cuda.synchronize()
                    print(f"# {n} rows {rows} {_name(launch)}: {repr(e)[:100]}")
                    continue
                times.append((us, err, launch))
            picked, bfly = times[0], next(t for t in times if t[2]["kernel"] == "butterfly")
            best = min(times, key=lambda t: t[0])
            floor = rows * n * (x.element_size() + 2) / bw * 1e6
            print(f"| {n} | {side} | {rows} | {picked[0]:.1f} | {bfly[0]:.1f} | {best[0]:.1f} | {floor:.1f} | "
                  f"{_name(best[2])} | {_name(picked[2])} | {max(t[1] for t in times):.1e} |", flush=True)
            for i, t in enumerate((picked, bfly, best)):
                layer[rows][i] += count * t[0]
            if args.sweep and os.environ.get("LOWBIT_SWEEP_ALL"):
                for us, err, launch in sorted(times, key=lambda t: t[0]):
                    print(f"#   {us:.1f} µs {_name(launch)} err {err:.1e}")
    for rows, (p, b, best) in layer.items():
        what = "one decoder layer's 8 transforms" if calls == list(CALLS) else "the transforms timed"
        print(f"# {what} at {rows} rows: picked {p:.1f} µs, butterfly {b:.1f} µs, "
              f"best {best:.1f} µs (x32 layers: {32 * p / 1e3:.2f} / {32 * b / 1e3:.2f} / {32 * best / 1e3:.2f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
