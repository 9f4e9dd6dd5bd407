"""Decode speed with and without programmatic dependent launch (or another switch), in one process:

    python -m benchmarks.pdl_ab --shape llama-2-7b --formats fp16,qtip2 --batch 1,16 --rounds 2
    python -m benchmarks.pdl_ab --knob chain --formats qtip2 --batch 1,16,64

Each model is built once; every round times the CUDA-graph decode (`lowbit.bench.bench_decode_model`,
graphs captured afresh) with the switch off and then on, so the two settings alternate on the same
weights, kernels and GPU state. `--knob pdl`: LOWBIT_PDL=0 / 1 with PDL on every launch, whatever its
rows (LOWBIT_PDL_MAX_ROWS lifted); `--knob chain`: LOWBIT_CHAIN_OUTPUTS=0 / 1 (a QTIP projection's
output transform in the next norm's launch); `--knob chain-split`: LOWBIT_CHAIN_SPLIT=0 / 1 (that chain
also where a row's transform is split over several programs: batch 1–8); `--knob dot-epilogues`:
LOWBIT_DOT_EPILOGUES=0 / 1 (SiLU·mul and the rotary step inside the product kernel's Hadamard launches
at 8–255 rows, or in launches of their own). Prints one JSON line a measurement and a table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from lowbit.bench import bench_decode_model, release_device_memory
from lowbit.quantized_models.synthetic import random_model

# knob -> (the variable set to 0 / 1, variables set alongside for both settings)
KNOBS = {"pdl": ("LOWBIT_PDL", {"LOWBIT_PDL_MAX_ROWS": str(1 << 30)}),  # "with": every launch, whatever its rows
         "chain": ("LOWBIT_CHAIN_OUTPUTS", {}),
         "chain-split": ("LOWBIT_CHAIN_SPLIT", {}),
         "dot-epilogues": ("LOWBIT_DOT_EPILOGUES", {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--formats", default="fp16,qtip2")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--knob", choices=sorted(KNOBS), default="pdl", help="the switch to turn off and on")
    args = ap.parse_args(argv)
    knob = KNOBS[args.knob]
    dev = torch.device("cuda")
    medians = []
    for variant in args.formats.split(","):
        model = random_model(args.shape, variant, device=dev)
        for batch in [int(b) for b in args.batch.split(",")]:
            runs = {"0": [], "1": []}
            for _ in range(args.rounds):
                for setting in ("0", "1"):
                    os.environ.update({knob[0]: setting, **knob[1]})
                    r = bench_decode_model(model, batch, args.prompt, args.gen)
                    runs[setting].append(r["tok_s"])
                    print(json.dumps({"variant": variant, "batch": batch, args.knob: setting, "tok_s": r["tok_s"],
                                      "step_ms": r["step_ms"]}), flush=True)
            medians.append((variant, batch, statistics.median(runs["0"]), statistics.median(runs["1"])))
        del model
        release_device_memory()
    for name in (knob[0], *knob[1]):
        os.environ.pop(name, None)
    print(f"\n# {args.knob} A/B: shape={args.shape} prompt={args.prompt} gen={args.gen} rounds={args.rounds} "
          f"device={torch.cuda.get_device_name()} torch={torch.__version__}")
    print("| format | batch | tok/s without | tok/s with | with / without |")
    print("|---|---|---|---|---|")
    for variant, batch, off, on in medians:
        print(f"| {variant} | {batch} | {off:.0f} | {on:.0f} | {on / off:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
