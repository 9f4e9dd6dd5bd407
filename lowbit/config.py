"""Engine and server settings: one dataclass each, the single source of defaults.

The CLI builds its flags from these fields' defaults, the engine and server read them; nothing else
hard-codes a limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model: str | None = None  # local dir, Hub id or .gguf file; None: the default model
    tokenizer: str | None = None
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: fp16 on cuda, fp32 on cpu
    max_model_len: int | None = None  # None: the model's context (capped by KV capacity)
    max_num_seqs: int = 64  # sequences decoded together in one step
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_queue: int = 256  # waiting requests beyond this are refused (HTTP 429)
    block_size: int = 16  # tokens per KV block
    kv_cache_blocks: int | None = None  # None: sized from gpu_memory_utilization (or 4 GiB on cpu)
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_gib: float = 1.0
    cuda_graphs: bool = True  # capture decode steps on CUDA
    # Mixed steps (prompt chunks beside decodes) of up to this many tokens replay CUDA graphs too,
    # padded to token buckets (engine/cuda_graphs.py). None: max_num_batched_tokens; 0: eager.
    cuda_graph_max_tokens: int | None = None
    # While sequences decode, a new prompt may wait up to this many steps so that prompts arriving
    # close together share one prefill step (engine/scheduler.py; benchmarks/RESULTS.md ninth session).
    prefill_wait_steps: int = 8
    prefill_min_waiting: int | None = None  # admit at once when this many wait; None: max_num_seqs // 8

    def __post_init__(self):
        checks = [
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_batched_tokens >= self.max_num_seqs, "max_num_batched_tokens must be >= max_num_seqs"),
            (self.max_queue >= 0, "max_queue must be >= 0"),
            (self.block_size in (8, 16, 32, 64), "block_size must be 8, 16, 32 or 64"),
            (0.05 <= self.gpu_memory_utilization <= 0.99, "gpu_memory_utilization must be in [0.05, 0.99]"),
            (self.kv_cache_blocks is None or self.kv_cache_blocks >= 2, "kv_cache_blocks must be >= 2"),
            (self.cuda_graph_max_tokens is None or self.cuda_graph_max_tokens >= 0,
             "cuda_graph_max_tokens must be >= 0"),
            (self.prefill_wait_steps >= 0, "prefill_wait_steps must be >= 0"),
            (self.prefill_min_waiting is None or self.prefill_min_waiting >= 1, "prefill_min_waiting must be >= 1"),
        ]
        for ok, why in checks:
            if not ok:
                raise ValueError(why)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the model path's last component
    api_key: str | None = field(default_factory=lambda: os.environ.get("LOWBIT_API_KEY") or None)
    max_request_bytes: int = 1 << 20  # bodies above this get 413 before parsing
    log_level: str = "info"
    # The engine thread and the HTTP event loop share the GIL. A thread that wants it back waits up
    # to Python's switch interval (5 ms by default) while the loop is busy streaming; the engine
    # thread wants it back after every GPU sync, so under many streams each step lost up to that:
    # 64 streams 2894 -> 3659 tok/s (fp16), 1952 -> 2405 (QTIP-2) at 5 -> 0.1 ms (RESULTS.md, ninth session).
    gil_switch_interval_ms: float = 0.1

    def __post_init__(self):
        if not 0 < self.gil_switch_interval_ms <= 100:
            raise ValueError("gil_switch_interval_ms must be in (0, 100]")
