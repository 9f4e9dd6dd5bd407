"""Asyncio load generator for an OpenAI-compatible server: N concurrent streaming chat clients.

Each client sends streaming chat requests back to back, drawing the prompt length and the output
length (max_tokens, with `ignore_eos` so the server generates exactly that many) from the given
distributions, until the duration is over or the request budget is spent. Requests in flight at the
deadline finish (bounded by --timeout). It reports throughput (tok/s), TTFT, inter-token latency,
time per output token and end-to-end latency percentiles, and errors by kind, and it accounts for
every request: started = ok + failed. A request is ok only when its stream is well formed: role
chunk, content, a finish_reason, the usage chunk and `data: [DONE]`.

    python -m load_tests.loadgen --url http://127.0.0.1:8000 --clients 32 --duration 30
    lowbit bench serve --clients 1,8,32,64 --duration 30       # a concurrency sweep, one table
    lowbit bench serve --clients 8 --requests 100 --prompt-tokens 32-256 --output-tokens 16-64 --json out.json

Distributions: `N` (fixed), `A-B` (uniform integers), `normal:MEAN:STD` (rounded, at least 1).
`--check-metrics` also compares the server's /metrics counters before and after the run with what
the clients received (valid when this load generator is the server's only client).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

MAX_CLIENTS = 1024
MAX_DURATION_S = 3600

# Common English words; a prompt of k words is roughly k tokens for BPE vocabularies.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue side "
    "kind head house service friend father power hour game line end member law car city community name team "
    "minute idea kid body information back parent face others level office door health person art war history "
    "party result change morning reason research girl guy moment air teacher force education river garden "
    "light music window paper market summer winter bread apple stone cloud forest bridge letter train"
).split()


class Distribution:
    """Integer lengths: `N`, `A-B` (uniform) or `normal:MEAN:STD`."""

    def __init__(self, spec: str):
        self.spec = spec
        try:
            if spec.startswith("normal:"):
                _, mean, std = spec.split(":")
                self.kind, self.a, self.b = "normal", float(mean), float(std)
            elif "-" in spec:
                lo, hi = spec.split("-")
                self.kind, self.a, self.b = "uniform", int(lo), int(hi)
                if not 1 <= self.a <= self.b:
                    raise ValueError
            else:
                self.kind, self.a, self.b = "fixed", int(spec), int(spec)
                if self.a < 1:
                    raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad length distribution {spec!r}: use N, A-B or normal:MEAN:STD (lengths >= 1)") from None

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def __repr__(self) -> str:
        return self.spec


def make_prompt(rng: random.Random, words: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(max(1, words - 8)))
    return f"Write a story that uses these words: {body}"


@dataclass
class Record:
    """One request as the client saw it (times in seconds from its start)."""

    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_tokens: int = 0
    finish_reason: str | None = None


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def q(p: float) -> float:
        k = (len(v) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"n": len(v), "mean": sum(v) / len(v), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": v[-1]}


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, body: dict, timeout: float) -> Record:
    rec = Record(max_tokens=body["max_tokens"])
    start = time.perf_counter()
    last = None
    role_seen = done = False
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    rec.error = f"http_{resp.status_code}"
                    return rec
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        rec.error = f"stream_error: {chunk['error'].get('code') or chunk['error'].get('type')}"
                        return rec
                    if chunk.get("usage"):
                        rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        rec.completion_tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        delta = choice.get("delta", {})
                        role_seen |= delta.get("role") == "assistant"
                        if delta.get("content"):
                            now = time.perf_counter()
                            if last is None:
                                rec.ttft = now - start
                            else:
                                rec.itl.append(now - last)
                            last = now
                        if choice.get("finish_reason"):
                            rec.finish_reason = choice["finish_reason"]
    except TimeoutError:
        rec.error = "timeout"
        return rec
    except httpx.HTTPError as e:
        rec.error = f"http_error: {type(e).__name__}"
        return rec
    except (json.JSONDecodeError, KeyError, TypeError):
        rec.error = "malformed_chunk"
        return rec
    rec.e2e = time.perf_counter() - start
    missing = [what for what, ok in (("role chunk", role_seen), ("[DONE]", done), ("finish_reason", rec.finish_reason),
                                     ("usage", rec.completion_tokens > 0)) if not ok]
    if missing:
        rec.error = "incomplete_stream: no " + ", ".join(missing)
    else:
        rec.ok = True
    return rec


async def scrape(client: httpx.AsyncClient, base: str) -> dict[str, float]:
    """The server's counters that the run can be checked against."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get(base + "/metrics")).text
    out = {"chat_200": 0.0, "chat_other": 0.0, "prompt_tokens": 0.0, "generation_tokens": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "lowbit_requests_total" and s.labels.get("endpoint") == "/v1/chat/completions":
                out["chat_200" if s.labels.get("status") == "200" else "chat_other"] += s.value
            elif s.name == "lowbit_prompt_tokens_total":
                out["prompt_tokens"] = s.value
            elif s.name == "lowbit_generation_tokens_total":
                out["generation_tokens"] = s.value
    return out


async def run(args: argparse.Namespace) -> dict:
    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients + 2)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.timeout)) as client:
        model = args.model
        if model is None:
            models = await client.get(base + "/v1/models", headers=headers)
            models.raise_for_status()
            model = models.json()["data"][0]["id"]
        before = await scrape(client, base) if args.check_metrics else None
        rng = random.Random(args.seed)
        records: list[Record] = []
        started = 0
        t0 = time.perf_counter()
        deadline = t0 + args.duration if args.duration else None

        def next_body() -> dict | None:
            nonlocal started
            if args.requests is not None and started >= args.requests:
                return None
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            started += 1
            return {"model": model, "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": make_prompt(rng, args.prompt_tokens.sample(rng))}],
                    "max_tokens": args.output_tokens.sample(rng), "temperature": args.temperature,
                    "ignore_eos": not args.allow_eos, "seed": rng.randrange(1 << 31)}

        async def worker() -> None:
            while (body := next_body()) is not None:
                records.append(await one_request(client, base + "/v1/chat/completions", headers, body,
                                                 args.timeout))

        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
        report = summarize(args, model, records, started, wall, before, None)
        for _ in range(8 if args.check_metrics else 0):
            # A response is counted once its last byte is sent, which can trail the client's read.
            report = summarize(args, model, records, started, wall, before, await scrape(client, base))
            if report["server_metrics"]["matches"]:
                break
            await asyncio.sleep(0.25)
    return report


def summarize(args, model: str, records: list[Record], started: int, wall: float, before, after) -> dict:
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    completion = sum(r.completion_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    if not args.allow_eos:
        short = sum(1 for r in ok if r.completion_tokens != r.max_tokens)
        if short:
            errors["wrong_output_length"] = short
    tpot = [(r.e2e - r.ttft) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1 and r.ttft]
    report = {
        "url": args.url, "model": model, "clients": args.clients, "duration_s": args.duration,
        "request_limit": args.requests, "prompt_tokens_dist": repr(args.prompt_tokens),
        "output_tokens_dist": repr(args.output_tokens), "wall_s": wall,
        "requests": {"started": started, "ok": len(ok), "failed": len(records) - len(ok),
                     "accounted": started == len(records), "errors": errors},
        "tokens": {"prompt": prompt, "completion": completion},
        "throughput": {"output_tok_s": completion / wall if wall else 0.0,
                       "total_tok_s": (prompt + completion) / wall if wall else 0.0,
                       "requests_s": len(ok) / wall if wall else 0.0},
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles([r.e2e for r in ok if r.e2e is not None]),
    }
    if before is not None and after is not None:
        delta = {k: after[k] - before[k] for k in after}
        report["server_metrics"] = {
            "delta": delta,
            "matches": delta["chat_200"] == len(records) - sum(v for k, v in errors.items()
                                                                if k.startswith("http_"))
            and delta["generation_tokens"] == sum(r.completion_tokens for r in records)
            and delta["prompt_tokens"] == sum(r.prompt_tokens for r in records),
        }
    report["passed"] = (report["requests"]["failed"] == 0 and not errors and report["requests"]["accounted"]
                        and report.get("server_metrics", {}).get("matches", True))
    return report


def format_report(r: dict) -> str:
    def row(name: str, p: dict, scale: float = 1e3) -> str:
        if not p.get("n"):
            return f"{name:10s} -"
        return (f"{name:10s} mean {p['mean'] * scale:8.1f}  p50 {p['p50'] * scale:8.1f}  p90 {p['p90'] * scale:8.1f}"
                f"  p99 {p['p99'] * scale:8.1f}  max {p['max'] * scale:8.1f}  (ms, n={p['n']})")

    q = r["requests"]
    lines = [
        f"load: {r['clients']} clients, model {r['model']} at {r['url']}, prompt ~{r['prompt_tokens_dist']} words, "
        f"output {r['output_tokens_dist']} tokens, wall {r['wall_s']:.1f} s",
        f"requests   started {q['started']}  ok {q['ok']}  failed {q['failed']}  "
        f"accounted {'yes' if q['accounted'] else 'NO'}  errors {q['errors'] or 'none'}",
        f"tokens     prompt {r['tokens']['prompt']}  completion {r['tokens']['completion']}",
        f"throughput {r['throughput']['output_tok_s']:.1f} output tok/s, {r['throughput']['total_tok_s']:.1f} total "
        f"tok/s, {r['throughput']['requests_s']:.2f} req/s",
        row("TTFT", r["ttft_s"]), row("ITL", r["itl_s"]), row("TPOT", r["tpot_s"]), row("e2e", r["e2e_s"]),
    ]
    if "server_metrics" in r:
        m = r["server_metrics"]
        lines.append(f"/metrics   {'match' if m['matches'] else 'MISMATCH'}: {m['delta']}")
    lines.append("PASS" if r["passed"] else "FAIL")
    return "\n".join(lines)


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _levels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def sweep_table(reports: list[dict], model_column: bool = False) -> str:
    """One row per (model,) concurrency level: what `lowbit bench serve` reports for a list of
    levels, with each level's ITL p50 over the same model's single-stream ITL p50 where measured."""
    head = ["model"] if model_column else []
    head += ["clients", "requests ok", "failed", "output tok/s", "TTFT p50 ms", "TTFT p90 ms", "ITL p50 ms",
             "ITL p90 ms", "ITL p50 / 1-stream"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    solo = {r["model"]: r["itl_s"]["p50"] for r in reports if r["clients"] == 1 and r["itl_s"].get("n")}

    def ms(p, k):
        return f"{p[k] * 1e3:.1f}" if p.get("n") else "-"

    for r in reports:
        t, i = r["ttft_s"], r["itl_s"]
        ratio = f"{i['p50'] / solo[r['model']]:.2f}" if i.get("n") and solo.get(r["model"]) else "-"
        cells = [r["model"]] if model_column else []
        cells += [r["clients"], r["requests"]["ok"], r["requests"]["failed"], f"{r['throughput']['output_tok_s']:.1f}",
                  ms(t, "p50"), ms(t, "p90"), ms(i, "p50"), ms(i, "p90"), ratio]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadgen", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    p.add_argument("--clients", "-c", type=_levels, default=[8],
                   help="concurrent streaming clients; a comma-separated list (1,8,32,64) runs one load per level "
                        "and prints a sweep table (default: 8)")
    p.add_argument("--duration", "-d", type=float, default=None, help="seconds to keep starting requests")
    p.add_argument("--requests", "-n", type=int, default=None, help="total requests to send")
    p.add_argument("--prompt-tokens", type=Distribution, default=Distribution("32-128"),
                   help="prompt length in words, ~tokens (default: %(default)s)")
    p.add_argument("--output-tokens", type=Distribution, default=Distribution("16-64"),
                   help="max_tokens per request (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--allow-eos", action="store_true",
                   help="let the model stop early (default: ignore_eos, so outputs have exactly max_tokens)")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt and length draws")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request limit in seconds")
    p.add_argument("--check-metrics", action="store_true",
                   help="compare the server's /metrics counters with what the clients received")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON ('-': stdout)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    args = p.parse_args(argv)
    if args.duration is None and args.requests is None:
        args.duration = 30.0
    if not all(1 <= c <= MAX_CLIENTS for c in args.clients):
        p.error(f"--clients must be in [1, {MAX_CLIENTS}]")
    if args.duration is not None and not 0 < args.duration <= MAX_DURATION_S:
        p.error(f"--duration must be in (0, {MAX_DURATION_S}]")
    if args.requests is not None and args.requests < 1:
        p.error("--requests must be at least 1")
    if not is_loopback(args.url) and not args.allow_remote:
        p.error(f"{args.url} is not a loopback address; pass --allow-remote to load a remote server")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reports = []
    for clients in args.clients:
        level = argparse.Namespace(**{**vars(args), "clients": clients})
        try:
            reports.append(asyncio.run(run(level)))
        except httpx.HTTPError as e:
            print(f"error: cannot reach {args.url}: {e}", file=sys.stderr)
            return 2
    # one level: that level's report; several: {"sweep": [...], "passed": all passed}
    result = reports[0] if len(reports) == 1 else {"sweep": reports, "passed": all(r["passed"] for r in reports)}
    if args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
        if len(reports) > 1:
            print("\n" + sweep_table(reports))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0 if result["passed"] else 1

if __name__ == "__main__":
    sys.exit(main())
