"""What both generation endpoints share: limits, sampling parameters, the engine requests behind one
HTTP request (with their metrics), and token text for logprobs.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

from ..config import ServerConfig
from ..engine import QueueFullError, RequestOutput, SamplingParams
from .errors import APIError, bad_request
from .metrics import Metrics
from .protocol import SamplingFields

RETRY_AFTER_S = 1
_SEED_RANGE = 1 << 62  # the engine hashes int64 seeds and uses seed + i for choice i


def check_context(prompt_len: int, max_tokens: int | None, limit: int, prompt_param: str) -> None:
    """The engine checks these too; checking here names the field at fault in the 400."""
    if prompt_len >= limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens, and your prompt has "
                          f"{prompt_len} tokens (the context must also hold at least one generated token).",
                          prompt_param, "context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > limit:
        raise bad_request(f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds this model's "
                          f"maximum context length of {limit} tokens; ask for at most {limit - prompt_len}.",
                          "max_tokens", "context_length_exceeded")


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=None if req.seed is None else req.seed % _SEED_RANGE,
            stop=req.stop_list(), stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
            n=req.n, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except ValueError as e:  # SamplingParams names the field first: "top_p must be in (0, 1], got 0"
        raise bad_request(str(e), str(e).split(" ", 1)[0], "invalid_value") from None


def finite(logprob: float) -> float:
    """JSON has no -inf; OpenAI-compatible servers clamp impossible tokens to a large negative value."""
    return logprob if math.isfinite(logprob) else -9999.0


class TokenText:
    """Each token's own text, as logprobs report it (cached: the same ids recur constantly)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"
            self._cache[token_id] = text
        return text


class GenerationRun:
    """The engine requests behind one HTTP request: `params.n` choices for each prompt.

    `start()` submits them and waits for each one's first output, so limit errors (queue full, context)
    become HTTP errors before any response byte is sent. `outputs()` then yields (prompt index, the
    cumulative RequestOutput) as they come. `close()` aborts whatever is unfinished (their KV blocks are
    freed at the engine's next step) and settles the token counters and latency histograms.
    """

    def __init__(self, engine, metrics: Metrics, prompts: list[list[int]], params: SamplingParams,
                 request_id: str, arrival: float, count_output: bool = True):
        self.engine, self.metrics = engine, metrics
        self.prompts, self.params, self.request_id = prompts, params, request_id
        self.arrival = arrival
        self.count_output = count_output  # False when the generated token is dropped (echo, max_tokens=0)
        self.gens: list = []
        self.latest: list[RequestOutput | None] = [None] * len(prompts)
        self._last_token_time: list[float | None] = [None] * len(prompts)
        self._first_token_seen = False
        self._settled = [False] * len(prompts)
        self._closed = False

    async def start(self) -> None:
        self.gens = [self.engine.generate(ids, self.params, f"{self.request_id}-{i}")
                     for i, ids in enumerate(self.prompts)]
        firsts = await asyncio.gather(*(g.__anext__() for g in self.gens), return_exceptions=True)
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            await self.close(account=False)
            err = next((e for e in errors if isinstance(e, QueueFullError | ValueError)), errors[0])
            if isinstance(err, QueueFullError):
                raise APIError(429, f"the server is overloaded: {err}", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            if isinstance(err, ValueError):
                raise bad_request(str(err), code="invalid_value") from None
            raise err
        for ids in self.prompts:
            self.metrics.prompt_tokens.inc(len(ids))
            self.metrics.prompt_len.observe(len(ids))
        for i, out in enumerate(firsts):
            self._observe(i, out)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            for i, out in enumerate(self.latest):
                yield i, out
            pending = [i for i, out in enumerate(self.latest) if not out.finished]
            if len(pending) == 1:
                i = pending[0]
                async for out in self.gens[i]:
                    self._observe(i, out)
                    yield i, out
            elif pending:
                async for i, out in self._merged(pending):
                    self._observe(i, out)
                    yield i, out
        finally:
            await self.close()

    async def _merged(self, pending: list[int]) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for out in self.gens[i]:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i)) for i in pending]
        try:
            remaining = len(pending)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self) -> list[RequestOutput]:
        """Run to completion (non-streaming); returns the final output of each prompt."""
        async for _ in self.outputs():
            pass
        return list(self.latest)

    def _observe(self, i: int, out: RequestOutput) -> None:
        now = time.monotonic()
        before = self.latest[i]
        old = [len(c.token_ids) for c in before.outputs] if before is not None else [0] * len(out.outputs)
        new = max((len(c.token_ids) - o for c, o in zip(out.outputs, old, strict=True)), default=0)
        if new > 0:
            if not self._first_token_seen:
                self._first_token_seen = True
                self.metrics.ttft.observe(now - self.arrival)
            if self._last_token_time[i] is not None:
                gap = (now - self._last_token_time[i]) / new
                for _ in range(new):
                    self.metrics.itl.observe(gap)
            self._last_token_time[i] = now
        self.latest[i] = out
        if out.finished:
            if any(c.finish_reason == "abort" for c in out.outputs):
                self._settle(i)
                raise APIError(503, "the request was aborted: the server is shutting down", code="aborted")
            self.metrics.e2e.observe(now - self.arrival)
            self._settle(i)

    def _settle(self, i: int) -> None:
        """Count prompt i's generated tokens once, whether it finished or was cut short."""
        if self._settled[i] or self.latest[i] is None:
            return
        self._settled[i] = True
        tokens = self.completion_tokens(i)
        self.metrics.output_len.observe(tokens)
        self.metrics.generation_tokens.inc(tokens)

    def completion_tokens(self, i: int) -> int:
        out = self.latest[i]
        if out is None or not self.count_output:
            return 0
        return sum(len(c.token_ids) for c in out.outputs)

    async def close(self, account: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        for g in self.gens:
            await g.aclose()
        if account:
            for i in range(len(self.prompts)):
                self._settle(i)


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) response was ready."""


async def until_disconnected(request, awaitable):
    """Await `awaitable`, cancelling it if the client disconnects first.

    Starlette notices disconnects only while streaming; a non-streaming handler would otherwise keep
    generating for a client that is gone. Only call this after the body has been read.
    """
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(awaitable)
    watch = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientDisconnected()
    return work.result()


class ServerState:
    """What the routes share: settings, the engine (None while it loads), metrics."""

    def __init__(self, config: ServerConfig, engine=None):
        self.config = config
        self.engine = engine
        self.load_error: str | None = None
        self.started = time.time()
        self.metrics = Metrics(lambda: self.engine if self.ready else None, lambda: self.model_name)

    @property
    def ready(self) -> bool:
        return self.engine is not None and getattr(self.engine, "ready", True)

    @property
    def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        return self.engine.model_name if self.engine is not None else ""

    def require_engine(self):
        if not self.ready:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, why, code="not_ready", headers={"Retry-After": str(RETRY_AFTER_S * 5)})
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           "model", "model_not_found")
