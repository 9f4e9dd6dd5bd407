"""The engine: one loop that owns the device, fed by any number of concurrent requests.

`generate()` (async) registers a request and yields its cumulative outputs; a background thread
runs `step()` whenever there is work: schedule, execute, sample, detokenize, hand each touched
request its new output through the asyncio loop it came from. `run()` drives the same `step()`
synchronously for the offline `LLM` API. Finished, failed or cancelled sequences give their KV
blocks back inside the step that ends them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import torch

from ..config import EngineConfig
from ..quantized_models.loader import load_model
from .kv_cache import KVCache
from .outputs import RequestOutput
from .request import Request, Sequence
from .runner import ModelRunner
from .sampler import prompt_logprob_entries, sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler

log = logging.getLogger("lowbit")

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


def display_name(source: str) -> str:
    """What /v1/models calls the model: a Hub id as given, else the file or folder name."""
    p = Path(source)
    if not p.exists():
        return source
    if p.suffix == ".gguf":
        return re.sub(r"\.(I?Q\d\w*|F16|F32|BF16)$", "", p.name[:-5], flags=re.IGNORECASE)
    return p.name


class Engine:
    def __init__(self, config: EngineConfig | None = None, model=None, **overrides):
        self.config = config = config or EngineConfig(**overrides)
        if model is None:
            dtype = None if config.dtype in (None, "auto") else _DTYPES[config.dtype]
            model = load_model(config.model, device=config.device, dtype=dtype, tokenizer=config.tokenizer)
        self.model = model
        self.tokenizer = model.tokenizer
        self.model_name = display_name(model.name) if model.name else "model"
        mc = model.config
        num_blocks = config.kv_cache_blocks or self._auto_blocks()
        self.cache = KVCache(mc.num_layers, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim,
                             model.device, model.dtype)
        self.max_model_len = min(mc.max_position_embeddings, config.max_model_len or 1 << 30,
                                 self.cache.pool.total * config.block_size)
        self.eos_ids = set(mc.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.scheduler = Scheduler(self.cache, config)
        self.runner = ModelRunner(model, self.cache, config, self.max_model_len)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._new: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._requests: dict[str, Request] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._recent: deque[tuple[float, int]] = deque()
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "steps_total": 0}
        self.ready = True

    # ---- set-up -------------------------------------------------------------------------------
    def _auto_blocks(self) -> int:
        mc, cfg = self.model.config, self.config
        per_block = KVCache.bytes_per_block(mc.num_layers, cfg.block_size, mc.num_kv_heads, mc.head_dim,
                                            self.model.dtype)
        if self.model.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.model.device)
            # Leave room for activations, logits and CUDA graphs of the largest step.
            reserve = 1 << 30
            budget = total * cfg.gpu_memory_utilization - (total - free) - reserve
        else:
            budget = cfg.cpu_kv_cache_gib * (1 << 30)
        # No point holding more than max_num_seqs full-length sequences.
        cap = cfg.max_num_seqs * -(-mc.max_position_embeddings // cfg.block_size) + 1
        blocks = min(int(budget // per_block), cap)
        if blocks < 2:
            raise RuntimeError(f"not enough memory for a KV cache ({budget / 2**20:.0f} MiB free for "
                               f"{per_block / 2**20:.2f} MiB blocks); lower --gpu-memory-utilization's "
                               f"reserve or pass --kv-cache-blocks")
        return blocks

    def info(self) -> dict:
        lins = self.model.quant_linears()
        weights = sum(m.in_features * m.out_features for _, m in lins)
        bpw = 8.0 * sum(m.storage_bytes for _, m in lins) / weights if weights else 0.0
        return {"format": self.model.fmt, "bits_per_weight": round(bpw, 3), "kv_blocks": self.cache.pool.total,
                "block_size": self.cache.block_size, "kv_tokens": self.cache.pool.total * self.cache.block_size,
                "device": str(self.model.device), "dtype": str(self.model.dtype).replace("torch.", ""),
                "max_model_len": self.max_model_len, "max_num_seqs": self.config.max_num_seqs,
                "cuda_graphs": self.runner.graphs is not None,
                "mixed_graph_tokens": self.runner.mixed.buckets[-1] if self.runner.mixed is not None else 0}

    def stats(self) -> dict:
        now = time.monotonic()
        with self._lock:
            waiting_new = len(self._new)
        window = [(t, n) for t, n in list(self._recent) if now - t <= 10.0]
        span = max(now - window[0][0], 1.0) if window else 1.0
        pool = self.cache.pool
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting) + waiting_new,
                "kv_usage": 1.0 - pool.free / pool.total, "free_blocks": pool.free, "total_blocks": pool.total,
                "generation_tokens_per_s": sum(n for _, n in window) / span,
                "preemptions_total": self.scheduler.preemptions, **self.counters}

    # ---- requests -------------------------------------------------------------------------------
    def make_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     prompt: str | None = None) -> Request:
        """Validate against the context and queue limits and build the request (not yet queued)."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        n, limit = len(prompt_ids), self.max_model_len
        if n >= limit:
            raise ValueError(f"the prompt has {n} tokens; this model's context is {limit} tokens, "
                             f"which must also hold at least one generated token")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise ValueError(f"max_tokens={max_tokens} plus the prompt's {n} tokens exceeds the context of "
                             f"{limit} tokens; ask for at most {limit - n}")
        if self.stats()["waiting"] >= self.config.max_queue:
            raise QueueFullError(f"{self.config.max_queue} requests are already waiting; retry later")
        return Request(request_id or uuid.uuid4().hex, prompt_ids, params, self.tokenizer, max_tokens,
                       self.eos_ids, prompt)

    def submit(self, request: Request) -> None:
        with self._lock:
            self._new.append(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
        self._wake.set()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       prompt: str | None = None):
        """Yield cumulative RequestOutputs until finished; closing early aborts the request."""
        req = self.make_request(prompt_ids, params, request_id, prompt)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        req.sink = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)
        self.start()
        self.submit(req)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                while not queue.empty():  # coalesce: only the newest cumulative output matters
                    nxt = queue.get_nowait()
                    item = nxt if not isinstance(item, BaseException) else item
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(req.id)

    def run(self, requests: list[Request]) -> list[RequestOutput]:
        """Offline: run the given requests to completion on the calling thread."""
        if self._thread is not None:
            raise RuntimeError("run() cannot be used while the background loop is running")
        for r in requests:
            self.submit(r)
        while any(not r.finished for r in requests):
            self.step()
        return [r.output() for r in requests]

    # ---- the loop -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lowbit-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for req in list(self._requests.values()):
            self._end(req, "abort")

    def _loop(self) -> None:
        while not self._stopping:
            try:
                busy = self.step()
            except Exception as e:  # a failing step fails its requests, never the loop
                log.exception("engine step failed")
                self._fail_all(e)
                busy = False
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _fail_all(self, error: Exception) -> None:
        for req in list(self._requests.values()):
            for seq in req.seqs:
                self.scheduler.finish(seq)
            self._requests.pop(req.id, None)
            if req.sink is not None:
                req.sink(RuntimeError(f"internal error while generating: {error}"))

    def _end(self, req: Request, reason: str) -> None:
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = reason
            self.scheduler.finish(seq)
        self._requests.pop(req.id, None)
        if req.sink is not None:
            req.sink(req.output())

    def _admit(self) -> None:
        with self._lock:
            new, self._new = list(self._new), deque()
            aborts, self._aborts = self._aborts, set()
        for req in new:
            if req.id in aborts:
                continue
            self._requests[req.id] = req
            self.counters["prompt_tokens_total"] += len(req.prompt_ids)
            for seq in req.seqs:
                self.scheduler.add(seq)
        for rid in aborts:
            if rid in self._requests:
                self._end(self._requests[rid], "abort")

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling + model step; returns False when there was nothing to do."""
        self._admit()
        batch = self.scheduler.schedule()
        if not batch:
            return False
        result = self.runner.execute(batch)
        touched: dict[str, Request] = {}
        for seq, n in batch:
            seq.num_computed += n
        for seq, (logits, targets) in result.prompt_rows.items():
            seq.prompt_logprobs += prompt_logprob_entries(logits, targets, seq.request.params.prompt_logprobs)
        generated = 0
        if result.sample_seqs:
            tokens, entries = sample(result.sample_logits, result.sample_seqs)
            for seq, tok, entry in zip(result.sample_seqs, tokens, entries, strict=False):
                self._append(seq, tok, entry)
                generated += 1
                touched[seq.request.id] = seq.request
        self.counters["generation_tokens_total"] += generated
        self.counters["steps_total"] += 1
        self._recent.append((time.monotonic(), generated))
        while self._recent and time.monotonic() - self._recent[0][0] > 10.0:
            self._recent.popleft()
        for req in touched.values():
            if req.finished:
                self._end(req, "stop")
            elif req.sink is not None:
                req.sink(req.output())
        return True

    def _append(self, seq: Sequence, tok: int, entry: dict | None) -> None:
        req = seq.request
        seq.tokens.append(tok)
        if seq.logprobs is not None:
            seq.logprobs.append(entry)
        if tok in req.stop_ids:
            seq.finish_reason = "stop"
        elif seq.detok.add(tok):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= req.max_tokens or len(seq.tokens) >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finished:
            self.scheduler.finish(seq)
