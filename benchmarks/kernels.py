"""Kernel benchmark suite (`lowbit bench kernels`): every quantized format's fused kernels beside
cuBLAS fp16 and the copy-bandwidth roofline, all measured in one run.

Formats: QTIP HYB 2/3/4-bit (`lowbit.kernels.qtip_triton`, this file) and the uniform / VPTQ rows
of `benchmarks.kernels_uv` (imported, same helpers). Shapes: the Llama-2-7B, Llama-3-8B and
Llama-2-70B projections; batches 1, 2, 4, 8, 16, 32, 64.

Per QTIP row:
* `layer µs`: the whole QTIPLinear forward (input Hadamard with SU, decode kernel, output Hadamard
  with SV and the cast): what a decoder layer pays.
* `kernel µs`: the decode kernel alone (xh already transformed, y_raw left in float32) — the
  number to hold against the official `decompress_matvec` kernels, which exclude the transforms.
* speedups are cuBLAS fp16 (`torch.matmul`, same shape and batch) over each;
* GB/s = compressed bytes (codes + SU + SV + table, x and y once) ÷ layer time; the roofline is
  those bytes ÷ the device-to-device copy bandwidth measured at the start of the run.
* at batch ≥ 8 also "decode to fp16 + cuBLAS", the prefill path, to place the crossover.
Timing as in kernels_uv: CUDA-graph replays, rotating over enough copies of the codes that they
cannot stay in L2, median of 7 replays; the fused kernels' configuration from their tuner.

`--jobs N` compiles every kernel variant the run needs in N processes first (Triton compiles one
kernel at a time per process; the disk cache then serves the timing process).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import sys
import time

import torch

from benchmarks import kernels_uv as uv

SHAPES = uv.SHAPES
BATCHES = uv.BATCHES
DEV = "cuda"


# ----------------------------------------------------------------------------------------------
# QTIP layers with random codes (any bit pattern is a valid trellis walk)
# ----------------------------------------------------------------------------------------------


def qtip_layer(m: int, n: int, K: int, seed: int = 0):
    from lowbit.kernels.qtip import QTIPParams
    from lowbit.quantized_models.qtip import QTIPLinear

    p = QTIPParams(L=16, K=K, V=2, td_x=16, td_y=16, tlut_bits=9, decode_mode="quantlut_sym")
    g = torch.Generator(device=DEV).manual_seed(seed)
    codes = torch.randint(-(2**15), 2**15, (m // 16, n // 16, 16 * K), device=DEV, dtype=torch.int32,
                          generator=g).to(torch.int16)
    SU = (torch.randint(0, 2, (n,), device=DEV, generator=g) * 2 - 1).half()
    SV = (1 + 0.1 * torch.randn(m, device=DEV, generator=g)) / (32 * n**0.5)
    tlut = torch.randn(512, 2, device=DEV, generator=g).half()
    return QTIPLinear(p, n, m, codes, SU, SV, tlut)


def _clone(lin):
    from lowbit.quantized_models.qtip import QTIPLinear

    return QTIPLinear(lin.params, lin.in_features, lin.out_features, lin.codes.clone(), lin.SU, lin.SV, lin.tlut)


def qtip_bytes(lin) -> int:
    return sum(t.numel() * t.element_size() for t in (lin.codes, lin.SU, lin.SV, lin.tlut))


def _reference(lin, x):
    from lowbit.kernels.qtip import qtip_forward_reference

    return qtip_forward_reference(x.double(), lin.decoded_codes().double(), lin.SU.double(), lin.SV.double())


def bench_qtip(shapes, batches, bw, bits=(2, 3, 4), check=True, deadline=None):
    from lowbit.kernels import qtip_triton as qt

    rows = []
    for K in bits:
        for model, m, n in shapes:
            if deadline and time.time() > deadline:
                print(f"# time budget reached: skipping qtip{K} {model} {m}x{n}", flush=True)
                continue
            lin = qtip_layer(m, n, K, seed=m + n + K)
            wb = qtip_bytes(lin)
            copies = [lin] + [_clone(lin) for _ in range(uv.rotation(wb) - 1)]
            for b in batches:
                x = torch.randn(b, n, device=DEV, dtype=torch.float16)
                best, timings = qt.tune(lin, x, candidate_configs(lin, b))
                out = torch.full((b, m), float("nan"), device=DEV, dtype=torch.float16)
                qt.run_config(lin, x, best, out)
                err = None
                if check and b in (1, 16) and m * n <= 4096 * 11008:
                    ref = _reference(lin, x)
                    err = float((out.double() - ref).norm() / ref.norm())
                nan_free = not torch.isnan(out).any().item()
                layer_us = uv.graph_us([lambda c=c, x=x, cfg=best, o=out: qt.run_config(c, x, cfg, o) for c in copies])
                kernel_us = None
                if best.kind != "dequant":
                    xh = torch.randn(qt.xh_rows(best, b), n, device=DEV, dtype=qt.xh_dtype(best))
                    y_raw = torch.zeros(b, m, device=DEV, dtype=torch.float32)
                    kernel_us = uv.graph_us([lambda c=c, xh=xh, cfg=best, o=y_raw: qt.decode_matmul(c, xh, cfg, o)
                                             for c in copies])
                deq_us = None
                if b >= 8:
                    cfg = qt.QTIPConfig("dequant")
                    deq_us = uv.graph_us([lambda c=c, x=x, cfg=cfg, o=out: qt.run_config(c, x, cfg, o) for c in copies[:2]])
                res = dict(us=layer_us, kernel_us=kernel_us, config=str(best), path=best.kind, dequant_us=deq_us,
                           rel_err=err, nan_free=nan_free,
                           tuned=[(str(c), round(t, 2)) for c, t, _ in timings])
                row = uv._row("qtip", f"qtip{K}-hyb", model, m, n, b, wb, res, bw)
                if kernel_us:
                    row["kernel_us"] = round(kernel_us, 2)
                    row["kernel_speedup_vs_fp16"] = round(row["fp16_us"] / kernel_us, 2)
                rows.append(row)
                uv._print_row(row)
            del copies, lin
            torch.cuda.empty_cache()
    return rows


def candidate_configs(lin, batch):
    """The tuner's candidates, trimmed for the benchmark's time budget: the two best-predicted
    tile shapes of each kind and their splits."""
    from lowbit.kernels import qtip_triton as qt

    cands = qt.candidate_configs(lin, batch, torch.device(DEV))
    keep = [c for c in cands if not (c.kind == "gemv" and c.cols == 512)]
    return keep or cands


# ----------------------------------------------------------------------------------------------
# compiling ahead in worker processes
# ----------------------------------------------------------------------------------------------


def _compile_task(task):
    """Run every candidate configuration of one (format, shape, batch) once, which compiles it."""
    kind, fmt, m, n, b = task
    x = torch.randn(b, n, device=DEV, dtype=torch.float16)
    if kind == "qtip":
        from lowbit.kernels import qtip_triton as qt

        lin = qtip_layer(m, n, int(fmt))
        for cfg in candidate_configs(lin, b) + ([qt.QTIPConfig("dequant")] if b >= 8 else []):
            qt.run_config(lin, x, cfg)
        for cfg in candidate_configs(lin, b):
            if cfg.kind != "dequant":
                xh = torch.randn(qt.xh_rows(cfg, b), n, device=DEV, dtype=qt.xh_dtype(cfg))
                qt.decode_matmul(lin, xh, cfg, torch.zeros(b, m, device=DEV))
    elif kind == "uniform":
        from lowbit.kernels import uniform_triton as uq

        bits = int(fmt)
        p = uv.uniform_layer(m, n, bits, 32 if bits == 8 else 128)
        for cfg in uq.candidate_configs(p, b, x.device) + ([uq.UQConfig("dequant")] if b >= 8 else []):
            uq.run_config(x, p, None, cfg)
    elif kind == "vptq":
        from lowbit.kernels import vptq_triton as vq

        p = uv.vptq_layer(m, n, 256 if fmt == "3" else 0)
        for cfg in vq.candidate_configs(p, b, x.device) + ([vq.VQConfig("dequant")] if b >= 8 else []):
            vq.run_config(x, p, None, cfg)
    torch.cuda.synchronize()


def _compile_worker(tasks):
    done, failed = 0, []
    for t in tasks:
        try:
            _compile_task(t)
            done += 1
        except Exception as e:  # reported; the timing pass meets the same error with context
            failed.append(f"{t}: {e!r}"[:300])
    return done, failed


def precompile(tasks, jobs: int) -> None:
    if jobs < 1 or not tasks:
        return
    t0 = time.time()
    # Tasks of one format and batch share kernels: give each worker whole groups, largest first.
    groups: dict = {}
    for t in tasks:
        groups.setdefault((t[0], t[1], t[4]), []).append(t)
    buckets = [[] for _ in range(jobs)]
    for g in sorted(groups.values(), key=len, reverse=True):
        min(buckets, key=len).extend(g)
    if jobs == 1:
        results = [_compile_worker(buckets[0])]
    else:
        with mp.get_context("spawn").Pool(jobs) as pool:
            results = pool.map(_compile_worker, [b for b in buckets if b])
    failed = [f for _, fs in results for f in fs]
    print(f"# compiled ahead: {sum(d for d, _ in results)} tasks in {time.time() - t0:.0f} s with {jobs} "
          f"processes; {len(failed)} failed", flush=True)
    for f in failed[:5]:
        print("#   " + f, flush=True)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def qtip_table(rows) -> str:
    lines = ["| format | model | out×in | batch | layer µs | kernel µs | transforms µs | fp16 µs | speedup layer "
             "| speedup kernel | GB/s | roofline µs | % roofline | dequant+cuBLAS µs | config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kern = r.get("kernel_us")
        rest = f"{r['us'] - kern:.2f}" if kern else ""  # the two Hadamard launches (and casts)
        lines.append(f"| {r['format']} | {r['model']} | {r['m']}×{r['n']} | {r['batch']} | {r['us']} | "
                     f"{kern or ''} | {rest} | {r['fp16_us']} | {r['speedup_vs_fp16']}x | "
                     f"{r.get('kernel_speedup_vs_fp16', '')}{'x' if r.get('kernel_speedup_vs_fp16') else ''} | "
                     f"{r['gbs']} | {r['roofline_us']} | {r['pct_roofline']} | {r.get('dequant_us') or ''} | "
                     f"{r['config']} |")
    return "\n".join(lines)


def _parse(argv):
    ap = argparse.ArgumentParser(prog="lowbit bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="Llama-2-7B shapes, batch 1 and 16")
    ap.add_argument("--models", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,2,4,8,16,32,64)")
    ap.add_argument("--qtip-bits", default="2,3,4", help="QTIP K values; empty for none")
    ap.add_argument("--uv", default="int4,vptq2", help="uniform/VPTQ formats of kernels_uv (int2/3/4/8, q4_1, "
                    "vptq2, vptq3); empty for none")
    ap.add_argument("--uv-batches", default=None, help="batches for the uniform/VPTQ rows (default: --batches)")
    ap.add_argument("--jobs", type=int, default=0, help="compile ahead in this many processes")
    ap.add_argument("--compile-only", action="store_true", help="only compile ahead (with --jobs), time nothing")
    ap.add_argument("--budget", type=float, default=0, help="seconds; later QTIP shapes are skipped past it")
    ap.add_argument("--no-check", action="store_true", help="skip the in-run correctness checks")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="folder for kernels.md/json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("error: the kernel benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    models = [s for s in args.models.split(",") if s]
    batches = [1, 16] if args.quick else [int(b) for b in (args.batches or ",".join(map(str, BATCHES))).split(",")]
    if args.quick:
        models = ["llama-2-7b"]
    shapes = [(name, m, n) for name in models for m, n in SHAPES[name]]
    bits = [int(k) for k in args.qtip_bits.split(",") if k]
    uv_formats = [f for f in args.uv.split(",") if f]
    uv_batches = [int(b) for b in args.uv_batches.split(",")] if args.uv_batches else batches

    tasks = [("qtip", str(k), m, n, b) for k in bits for _, m, n in shapes for b in batches]
    for f in uv_formats:
        kind = "vptq" if f.startswith("vptq") else "uniform"
        if f.startswith("int") or f.startswith("vptq"):
            tasks += [(kind, f[-1], m, n, b) for _, m, n in shapes for b in uv_batches]
    precompile(tasks, max(args.jobs, 1 if args.compile_only else 0))
    if args.compile_only:
        return 0

    dev = torch.cuda.get_device_name(0)
    bw = uv.copy_bandwidth_gbs()
    print(f"# device {dev}; copy bandwidth {bw:.0f} GB/s; torch {torch.__version__}", flush=True)
    deadline = t0 + args.budget if args.budget else None
    rows = bench_qtip(shapes, batches, bw, bits, check=not args.no_check, deadline=deadline)
    uv_rows = uv.run(shapes, uv_batches, tuple(uv_formats), bw) if uv_formats else []
    for r in rows + uv_rows:
        r["copy_gbs"] = round(bw, 0)
    import triton

    meta = dict(device=dev, date=datetime.date.today().isoformat(), copy_gbs=round(bw, 0), torch=torch.__version__,
                triton=triton.__version__, command="lowbit bench kernels " + " ".join(sys.argv[1:] if argv is None
                                                                                       else argv),
                seconds=round(time.time() - t0))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows + uv_rows), f, indent=1)
    md = [f"# Kernel benchmark ({meta['date']}, {dev}, copy {meta['copy_gbs']:.0f} GB/s, torch {meta['torch']}, "
          f"triton {meta['triton']})", "", f"`{meta['command']}` — {meta['seconds']} s", ""]
    if rows:
        md += ["## QTIP (HYB, L=16, V=2, 16×16 tiles)", "", qtip_table(rows), ""]
    if uv_rows:
        md += ["## Uniform and VPTQ (benchmarks/kernels_uv.py)", "", uv.table(uv_rows), ""]
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write("\n".join(md))
    print(json.dumps(meta))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
