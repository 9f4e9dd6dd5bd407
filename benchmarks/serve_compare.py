"""Serving throughput of several weight formats on the same engine (issue 8's serving target).

For each model (default: random-weight Llama-2-7B shapes in fp16 and QTIP 2-bit, see
`lowbit.quantized_models.synthetic.load_random_model`) this starts `lowbit serve` on loopback,
drives it with the load generator at each concurrency level, stops it, and prints one table:
output tok/s, TTFT and inter-token latency percentiles, and ITL p50 over the same model's
single-stream ITL p50. `--warmup S` first drives each server for S seconds at the highest
concurrency, unreported: a fresh server compiles its prefill kernels on the first prompts of each
size, which a short measured run would otherwise count.

    python -m benchmarks.serve_compare --models random:llama-2-7b:fp16,random:llama-2-7b:qtip2 \\
        --clients 1,64 --duration 20
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from load_tests import loadgen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_load(model: str, args, out_dir: Path, extra: str = "") -> list[dict]:
    port = _free_port()
    tag = (model + ("_" + extra if extra else "")).replace(':', '_').replace('/', '_').replace(' ', '_')
    log_path = out_dir / f"serve_{tag}.log"
    log = open(log_path, "w+")
    cmd = [sys.executable, "-m", "lowbit.cli", "serve", "--model", model, "--port", str(port),
           "--max-num-seqs", str(max(args.clients)), "--log-level", "warning"]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    cmd += shlex.split(extra)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    t0 = time.monotonic()
    try:
        while "lowbit: serving" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() - t0 > args.start_timeout:
                raise RuntimeError(f"{model}: server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        startup = time.monotonic() - t0
        print(f"# {model}: serving after {startup:.0f} s", flush=True)
        json_path = out_dir / f"load_{tag}.json"
        common = ["--url", f"http://127.0.0.1:{port}", "--prompt-tokens", args.prompt_tokens,
                  "--output-tokens", args.output_tokens]
        if args.warmup > 0:
            loadgen.main([*common, "--clients", str(max(args.clients)), "--duration", str(args.warmup),
                          "--json", str(out_dir / f"warmup_{tag}.json")])
        loadgen.main([*common, "--clients", ",".join(map(str, args.clients)), "--duration", str(args.duration),
                      "--json", str(json_path)])
        result = json.loads(json_path.read_text())
        reports = result.get("sweep", [result])
        for r in reports:
            r["model"], r["startup_s"] = (f"{model} {extra}" if extra else model), startup
        return reports
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def table(rows: list[dict]) -> str:
    return loadgen.sweep_table(rows, model_column=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="random:llama-2-7b:fp16,random:llama-2-7b:qtip2")
    ap.add_argument("--clients", default="1,64")
    ap.add_argument("--tokenizer", default=None, help="tokenizer for random:* models (default: SmolLM2's)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds of unreported load at the top concurrency first")
    ap.add_argument("--prompt-tokens", default="64-128")
    ap.add_argument("--output-tokens", default="64-128")
    ap.add_argument("--server-args", default="",
                    help="';'-separated sets of extra `lowbit serve` flags: each model runs once per set")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        for extra in args.server_args.split(";"):
            rows += serve_and_load(model, args, out_dir, extra.strip())
            print(table(rows), flush=True)
    (out_dir / "serve_compare.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table(rows))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
