"""Batch-1 uniform decode-GEMV: the group-at-a-time kernel against the register-ring kernel, in one run.

    python -m benchmarks.uniform_gemv_ab --models llama-2-7b,llama-2-70b --bits 4

For every shape: cuBLAS fp16 and, for each kernel kind ("gemv": `_uq_gemv_kernel`, "ring":
`_uq_gemv_ring_kernel`), the fastest of its tuner candidates (cold L2, `tuning.cold_us`), then that
pick replayed over rotating weight copies (`kernels_uv.graph_us`, as the kernel matrix times), with
the output checked against the fp64 reference. Prints one JSON line a shape and a table of ratios.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks import kernels_uv as uv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-2-7b,llama-2-70b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    from lowbit.kernels import uniform_triton as uq

    bw = uv.copy_bandwidth_gbs()
    rows = []
    for model in args.models.split(","):
        for m, n in uv.SHAPES[model]:
            p = uv.uniform_layer(m, n, args.bits, args.group)
            x = torch.randn(args.batch, n, device="cuda", dtype=torch.float16)
            ref = x.double() @ uq.uniform_packed_dequant_reference(p).double().T
            cands = uq.candidate_configs(p, args.batch, x.device)
            _, timings = uq.tune(x, p, cands=cands)
            copies = [p] + [uv._clone_uniform(p) for _ in range(uv.rotation(p.nbytes) - 1)]
            out = torch.empty(args.batch, m, device="cuda", dtype=torch.float16)
            row = dict(model=model, m=m, n=n, fp16_us=round(uv.fp16_us(m, n, args.batch), 2),
                       roofline_us=round((p.nbytes + args.batch * (m + n) * 2) / bw / 1e3, 2))
            for kind in ("gemv", "ring"):
                ok = [(c, t) for c, t, e in timings if c.kind == kind and not e]
                if not ok:
                    row[kind] = None
                    continue
                cfg, cold = min(ok, key=lambda ct: ct[1])
                uq.run_config(x, p, None, cfg, out)
                err = float((out.double() - ref).norm() / ref.norm())
                us = uv.graph_us([lambda q=q, cfg=cfg: uq.run_config(x, q, None, cfg, out) for q in copies])
                row[kind] = dict(config=str(cfg), cold_us=round(cold, 2), us=round(us, 2), rel_err=err)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del copies, p
            torch.cuda.empty_cache()
    print(f"\n# int{args.bits} g{args.group} batch {args.batch}, {torch.cuda.get_device_name()}, copy {bw:.0f} GB/s")
    print("| shape | fp16 µs | gemv µs | ring µs | gemv vs fp16 | ring vs fp16 | ring vs gemv | ring % roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g, q = r["gemv"], r["ring"]
        if g and q:
            print(f"| {r['m']}×{r['n']} | {r['fp16_us']} | {g['us']} | {q['us']} | {r['fp16_us'] / g['us']:.2f} | "
                  f"{r['fp16_us'] / q['us']:.2f} | {g['us'] / q['us']:.2f} | {100 * r['roofline_us'] / q['us']:.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
