"""Offline batched generation: `lowbit.LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import os

import torch

from .engine.outputs import CompletionOutput, RequestOutput
from .engine.sampling_params import SamplingParams
from .quantized_models.attention import ContiguousKVCache
from .quantized_models.llama import CausalLM
from .quantized_models.loader import load_model

__all__ = ["LLM", "SamplingParams"]


def _sample(logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator | None) -> int:
    if sp.greedy:
        return int(logits.argmax())
    logits = logits.float() / sp.temperature
    if sp.top_k:
        kth = torch.topk(logits, min(sp.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if sp.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > sp.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0))
    return int(torch.multinomial(probs, 1, generator=gen))


class LLM:
    """Generates completions for a list of prompts with a contiguous KV cache, one prompt at a time."""

    def __init__(self, model: CausalLM | str | os.PathLike | None = None, **load_kwargs):
        self.model = model if isinstance(model, CausalLM) else load_model(model, **load_kwargs)
        self.tokenizer = self.model.tokenizer

    def _eos_ids(self) -> set[int]:
        ids = set(self.model.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @torch.inference_mode()
    def _generate_one(self, prompt_ids: list[int], sp: SamplingParams, index: int) -> CompletionOutput:
        m = self.model
        cfg = m.config
        max_new = sp.max_tokens or (cfg.max_position_embeddings - len(prompt_ids))
        total = len(prompt_ids) + max_new
        cache = ContiguousKVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, total, m.device, m.dtype)
        gen = None
        if sp.seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(sp.seed + index)
        eos = set() if sp.ignore_eos else self._eos_ids()
        stops = set(sp.stop_token_ids)
        ids = torch.tensor(prompt_ids, device=m.device)
        out: list[int] = []
        finish = "length"
        text = ""
        while len(out) < max_new:
            positions = torch.arange(cache.start, cache.start + len(ids), device=m.device)
            hidden = m(ids, positions, cache)
            cache.start += len(ids)
            tok = _sample(m.compute_logits(hidden[-1]).cpu(), sp, gen)
            if tok in eos or tok in stops:
                finish = "stop"
                break
            out.append(tok)
            if sp.stop and self.tokenizer is not None:
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                hit = min((text.find(s) for s in sp.stop if s in text), default=-1)
                if hit >= 0:
                    return CompletionOutput(index, text[:hit], out, "stop")
            ids = torch.tensor([tok], device=m.device)
        if self.tokenizer is not None:
            text = self.tokenizer.decode(out, skip_special_tokens=True)
        return CompletionOutput(index, text, out, finish)

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None,
                 ) -> list[RequestOutput]:
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        results = []
        for i, p in enumerate(prompts):
            ids = p if not isinstance(p, str) else self.tokenizer.encode(p)
            outs = [self._generate_one(list(ids), params, k) for k in range(params.n)]
            results.append(RequestOutput(str(i), p if isinstance(p, str) else None, list(ids), outs, True))
        return results

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        return self.generate([list(ids)], params)[0]
