"""`lowbit serve | generate | inspect | bench`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _add_model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="checkpoint directory, .gguf file or Hub id (default: SmolLM2-135M-Instruct)")
    else:
        p.add_argument("--model", "-m", default=None,
                       help="checkpoint directory, .gguf file or Hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id, when the checkpoint has none")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="activation dtype (default: float16 on GPU, float32 on CPU)")


def _load(args):
    import torch

    import lowbit

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return lowbit.load_model(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer,
                             progress=True)


def cmd_generate(args) -> int:
    import lowbit

    model = _load(args)
    if model.tokenizer is None:
        print("error: this checkpoint has no tokenizer; pass --tokenizer", file=sys.stderr)
        return 2
    llm = lowbit.LLM(model)
    sp = lowbit.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed)
    if model.tokenizer.chat_template and not args.raw:
        out = llm.chat([{"role": "user", "content": args.prompt}], sp)
    else:
        out = llm.generate([args.prompt], sp)[0]
    print(out.outputs[0].text)
    return 0


def model_summary(model) -> dict:
    """Architecture, format, bits per weight and memory of a loaded model (for inspect and serve)."""
    cfg = model.config
    lins = model.quant_linears()
    weights = sum(m.in_features * m.out_features for _, m in lins)
    lin_bytes = sum(m.storage_bytes for _, m in lins)
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters())
    fmts = {}
    for name, m in lins:
        fmts.setdefault(m.fmt, []).append(name)
    first = {f: dict(next(m for _, m in lins if m.fmt == f).describe()) for f in fmts}
    return {
        "model": model.name,
        "architecture": cfg.architecture,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": f"{cfg.num_heads} q / {cfg.num_kv_heads} kv x {cfg.head_dim}",
        "vocab_size": cfg.vocab_size,
        "context": cfg.max_position_embeddings,
        "format": model.fmt,
        "linears_by_format": {f: len(v) for f, v in fmts.items()},
        "format_parameters": first,
        "linear_bits_per_weight": round(8 * lin_bytes / max(weights, 1), 3),
        "linear_bytes": lin_bytes,
        "other_bytes": other,
        "total_bytes": lin_bytes + other,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
    }


def cmd_inspect(args) -> int:
    model = _load(args)
    s = model_summary(model)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
    for k, v in s.items():
        if k.endswith("bytes"):
            v = f"{v / 2**20:.1f} MiB"
        print(f"{k:24s} {v}")
    if args.layers:
        for name, m in model.quant_linears():
            print(f"  {name:40s} {m.fmt:6s} {m.out_features}x{m.in_features} bpw={m.bits_per_weight:.3f} "
                  f"{m.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .quantized_models.linear import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt (chat template applied when the model has one)")
    _add_model_args(g)
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="architecture, format, bits per weight and memory of a model")
    _add_model_args(i, positional=True)
    i.add_argument("--layers", action="store_true", help="one line per quantized Linear")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect, device_default="cpu")

    _add_optional_commands(sub)
    args = parser.parse_args(argv)
    if getattr(args, "device", None) is None and getattr(args, "device_default", None):
        args.device = args.device_default
    try:
        return args.func(args) or 0
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _add_optional_commands(sub) -> None:
    """Commands whose modules register their own sub-parsers (server, benchmarks)."""
    import importlib

    for mod in ("lowbit.server.cli", "lowbit.bench"):
        try:
            importlib.import_module(mod).add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name not in (mod, mod.rsplit(".", 1)[0]):
                raise


if __name__ == "__main__":
    sys.exit(main())
