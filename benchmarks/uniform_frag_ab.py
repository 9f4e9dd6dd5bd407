"""int4 g128: the CUDA-core kernels against the tensor-core fragment kernel, in one run.

    python -m benchmarks.uniform_frag_ab --models llama-2-7b,llama-2-70b --batches 1,16

For every shape and batch: cuBLAS fp16 and, per layout ("cuda cores" / packed: the packed layer's
gemv / mma / dequant candidates, `uniform_triton`; "frag": the same weight in the tensor-core
kernel's fragment layout, the layout a model's int4 layers are held in, with its candidates
`uniform_frag_triton.frag_configs` run by `frag_run`: the kernel, in 64-row chunks past 64 rows, and
Wᵀ decoded from that layout for cuBLAS), the fastest candidate (cold L2, `tuning.cold_us`), then
that pick replayed over rotating weight copies, each with both layouts of its own
(`kernels_uv.graph_us`, as the kernel matrix times it), its output checked against the fp64
reference. One JSON line a measurement, then a table.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import kernels_uv as uv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-2-7b,llama-2-70b")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--shapes", default="", help="OUTxIN,... instead of the models' shapes")
    args = ap.parse_args(argv)
    from lowbit.kernels import uniform_triton as uq

    bw = uv.copy_bandwidth_gbs()
    rows = []
    shapes = ([("custom", *map(int, sh.split("x"))) for sh in args.shapes.split(",")] if args.shapes else
              [(model, m, n) for model in args.models.split(",") for m, n in uv.SHAPES[model]])
    for model, m, n in shapes:
        p = uv.uniform_layer(m, n, 4, args.group)  # integer zeros 0..15: every layer can take the kernel
        w = uq.uniform_packed_dequant_reference(p).double()
        case = uv.uniform_case(p)  # the fragment layout repacked once from the packed layer
        copies = [case] + [uv._clone_uniform(case) for _ in range(uv.rotation(p.nbytes) - 1)]
        for batch in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(batch, n, device="cuda", dtype=torch.float16)
            ref = x.double() @ w.T
            _, timings = uv.tune_uniform(x, case)  # both families' candidates, each on its own layout
            out = torch.empty(batch, m, device="cuda", dtype=torch.float16)
            row = dict(model=model, m=m, n=n, batch=batch, fp16_us=round(uv.fp16_us(m, n, batch), 2),
                       roofline_us=round((p.nbytes + batch * (m + n) * 2) / bw / 1e3, 2))
            for fam, kinds in (("cuda_cores", ("gemv", "mma", "dequant")), ("frag", ("frag", uv.FRAG_DEQUANT))):
                ok = [(c, t) for c, t, e in timings if c.kind in kinds and not e]
                if not ok:
                    row[fam] = None
                    continue
                cfg, cold = min(ok, key=lambda ct: ct[1])
                uv.run_uniform(x, case, None, cfg, out)
                err = float((out.double() - ref).norm() / ref.norm())
                us = uv.graph_us([lambda q=q, cfg=cfg, x=x, out=out: uv.run_uniform(x, q, None, cfg, out) for q in copies])
                row[fam] = dict(kind=cfg.kind, config=str(cfg), cold_us=round(cold, 2), us=round(us, 2), rel_err=err)
            row["frag_launches"] = {f"{c.row_tiles},{c.num_warps},{c.prefetch}": round(t, 2)
                                    for c, t, e in timings if c.kind == "frag" and not e}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del copies, case, p, w
        torch.cuda.empty_cache()
    print(f"\n# int4 g{args.group}, {torch.cuda.get_device_name()}, copy {bw:.0f} GB/s")
    print("| shape | batch | fp16 µs | packed µs (pick) | frag µs (pick) | packed × fp16 | frag × fp16 | frag % roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g, f = r["cuda_cores"], r["frag"]
        if g and f:
            print(f"| {r['m']}×{r['n']} | {r['batch']} | {r['fp16_us']} | {g['us']} ({g['kind']}) | {f['us']} ({f['kind']}) | "
                  f"{r['fp16_us'] / g['us']:.2f} | {r['fp16_us'] / f['us']:.2f} | {100 * r['roofline_us'] / f['us']:.0f}% |")
    print("\nEvery fragment-kernel launch the tuner timed (row tiles, warps, prefetch: cold µs):")
    for r in rows:
        print(f"{r['m']}×{r['n']} batch {r['batch']}: " + ", ".join(f"{k}: {v}" for k, v in r["frag_launches"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
