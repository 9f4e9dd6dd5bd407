"""`lowbit serve`: flags built from EngineConfig and ServerConfig fields, then uvicorn.

Every field of the two dataclasses is a flag (`max_num_seqs` -> `--max-num-seqs`) whose default is the
dataclass's, so a new setting needs no CLI change and defaults live in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..config import EngineConfig, ServerConfig

_HELP = {
    "model": "checkpoint directory, .gguf file or Hub id (default: SmolLM2-135M-Instruct)",
    "tokenizer": "tokenizer directory or Hub id, when the checkpoint has none",
    "device": "cuda or cpu (default: cuda when available)",
    "dtype": "activation dtype (default: float16 on GPU, float32 on CPU)",
    "max_model_len": "context limit in tokens (default: the model's, capped by KV capacity)",
    "max_num_seqs": "sequences decoded together in one step",
    "max_num_batched_tokens": "token budget of one step (prefill chunks + decodes)",
    "max_queue": "waiting requests beyond this get HTTP 429",
    "block_size": "tokens per KV cache block",
    "kv_cache_blocks": "KV cache blocks (default: sized from --gpu-memory-utilization, or --cpu-kv-cache-gib)",
    "gpu_memory_utilization": "fraction of GPU memory the server may use (weights + KV cache + activations)",
    "cpu_kv_cache_gib": "KV cache size on CPU, GiB",
    "cuda_graphs": "capture decode and mixed steps in CUDA graphs",
    "cuda_graph_max_tokens": "mixed steps (prompt chunks) up to this many tokens replay CUDA graphs, padded to "
                             "token buckets; 0: eager (default: --max-num-batched-tokens)",
    "prefill_wait_steps": "while sequences decode, a new prompt may wait this many steps to share a prefill "
                          "step with later ones (0: join the next step)",
    "prefill_min_waiting": "admit waiting prompts at once when this many wait (default: max-num-seqs / 8)",
    "host": "address to listen on",
    "port": "port to listen on",
    "served_model_name": "model name in the API (default: the model path's last component)",
    "api_key": "require `Authorization: Bearer KEY` on /v1 (default: env LOWBIT_API_KEY)",
    "max_request_bytes": "request bodies above this get HTTP 413",
    "log_level": "uvicorn log level",
    "gil_switch_interval_ms": "how long a Python thread may keep the GIL from the engine thread "
                              "(Python's default is 5 ms)",
}
_CHOICES = {"dtype": ["float16", "bfloat16", "float32"], "block_size": [8, 16, 32, 64],
            "log_level": ["critical", "error", "warning", "info", "debug", "trace"]}


def _flag_type(f: dataclasses.Field):
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    ann = str(f.type).replace(" ", "").split("|")
    return next(kinds[a] for a in ann if a in kinds)


def _add_fields(p: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, "-m"] if f.name == "model" else [flag]
        kind = _flag_type(f)
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default is None else f" (default: {default})"
        if kind is bool:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=_HELP.get(f.name, "") + shown)
        else:
            p.add_argument(*names, dest=f.name, type=kind, default=None, choices=_CHOICES.get(f.name),
                           help=_HELP.get(f.name, "") + shown)


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """Only flags that were given override the dataclass defaults (so LOWBIT_API_KEY still applies)."""
    def given(cls) -> dict:
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}

    return EngineConfig(**given(EngineConfig)), ServerConfig(**given(ServerConfig))


def startup_line(server: ServerConfig, name: str, info: dict) -> str:
    host = f"[{server.host}]" if ":" in server.host else server.host
    return (f"lowbit: serving {name} at http://{host}:{server.port}/v1 | format {info['format']}, "
            f"{info['bits_per_weight']:.2f} bits/weight, {info['device']} {info['dtype']} | KV cache "
            f"{info['kv_blocks']} blocks x {info['block_size']} = {info['kv_tokens']} tokens, "
            f"context {info['max_model_len']}, up to {info['max_num_seqs']} sequences per step")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..engine import Engine
    from .app import create_app

    try:
        engine_config, server_config = configs_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outcome = {"code": 0}
    server: uvicorn.Server | None = None

    def on_ready(engine, error) -> None:
        if error is not None:
            print(f"error: could not load the model: {error}", file=sys.stderr, flush=True)
            outcome["code"] = 2
            server.should_exit = True
            return
        name = server_config.served_model_name or engine.model_name
        print(startup_line(server_config, name, engine.info()), flush=True)

    sys.setswitchinterval(server_config.gil_switch_interval_ms / 1e3)
    app = create_app(server_config, engine_factory=lambda: Engine(engine_config), on_ready=on_ready)
    server = uvicorn.Server(uvicorn.Config(app, host=server_config.host, port=server_config.port,
                                           log_level=server_config.log_level, timeout_graceful_shutdown=10))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown; that is a clean exit
        pass
    return outcome["code"]


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default model: SmolLM2-135M-Instruct)")
    _add_fields(p, EngineConfig)
    _add_fields(p, ServerConfig)
    p.set_defaults(func=cmd_serve)
