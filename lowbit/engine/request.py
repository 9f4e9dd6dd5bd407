"""Request and sequence state.

A request with `n` choices becomes `n` independent sequences (each prefills its own copy of the
prompt: simple, and `n` is small in practice). A sequence's tokens are prompt + generated; the KV
cache holds the first `num_computed` of them. Prefill, chunked prefill, decode and recompute after
preemption are then one rule: the next step computes tokens[num_computed:...] and, once every token
is computed, samples the next one.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # choice index within the request
    tokens: list[int]
    prompt_len: int
    seed: int
    detok: IncrementalDetokenizer
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict] | None = None
    # Prompt logprobs are gathered while the prompt is first computed (choice 0 only).
    prompt_logprobs: list[dict | None] | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        """Tokens still to compute before the next sample."""
        return len(self.tokens) - self.num_computed

    def completion(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.detok.visible_text(self.finished), list(self.output_ids),
                                self.finish_reason, None if self.logprobs is None else list(self.logprobs))


class Request:
    """What the engine tracks per submitted prompt."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer,
                 max_tokens: int, eos_ids: set[int], prompt: str | None = None):
        self.id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.arrival = time.monotonic()
        base_seed = params.seed if params.seed is not None else random.getrandbits(62)
        self.seqs = [
            Sequence(self, i, list(prompt_ids), len(prompt_ids), base_seed + i,
                     IncrementalDetokenizer(tokenizer, prompt_ids, params.stop),
                     logprobs=[] if params.logprobs is not None else None)
            for i in range(params.n)
        ]
        if params.prompt_logprobs is not None:
            self.seqs[0].prompt_logprobs = [None]
        self.aborted = False
        self.sink = None  # callable(RequestOutput) set by the engine front end

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        pl = self.seqs[0].prompt_logprobs
        return RequestOutput(self.id, self.prompt, self.prompt_ids, [s.completion() for s in self.seqs],
                             self.finished, None if pl is None else list(pl))
