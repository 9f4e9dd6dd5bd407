"""Batched token sampling with per-sequence parameters and reproducible seeds.

Every knob of SamplingParams is applied as a batched tensor operation. Randomness comes from a
counter-based hash of (seed, output position, token id) turned into Gumbel noise, and the token is
argmax(logits / T + noise) (the Gumbel-max trick, which samples exactly from softmax(logits / T)).
So a seeded request draws the same tokens whatever else shares its batch and on whichever device,
with no per-row generator objects or host round trips.
"""

from __future__ import annotations

import torch


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_C_SEED, _C_STEP, _C_TOK = _signed(0x9E3779B97F4A7C15), _signed(0xD1B54A32D192ED03), _signed(0xAEF17502108EF2D9)
_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (multiplication wraps)."""
    z = (z ^ _lsr(z, 30)) * _M1
    z = (z ^ _lsr(z, 27)) * _M2
    return z ^ _lsr(z, 31)


def hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) float32 [B, vocab], a pure function of (seed, step, token id)."""
    row = _mix(_mix(seeds * _C_SEED) + steps * _C_STEP)
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    z = _mix(row[:, None] + tok[None, :] * _C_TOK)
    return (_lsr(z, 40).float() + 0.5) * (1.0 / (1 << 24))


def _apply_penalties(logits: torch.Tensor, seqs) -> None:
    for i, s in enumerate(seqs):
        p = s.request.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(s.tokens)), device=logits.device)
            row = logits[i, seen]
            logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = s.output_ids
            if out:
                ids = torch.tensor(out, device=logits.device)
                counts = torch.zeros(logits.shape[1], device=logits.device).index_add_(
                    0, ids, torch.ones(len(out), device=logits.device))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus / min-p set to -inf (temperature applied)."""
    srt, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = rank >= top_k[:, None]
    probs = srt.softmax(-1)
    drop |= (probs.cumsum(-1) - probs) > top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    return logits.scatter(1, order, srt.masked_fill(drop, float("-inf")))


def sample(logits: torch.Tensor, seqs: list) -> tuple[list[int], list[dict | None]]:
    """logits [B, vocab] (float32) for `seqs` -> (next token per row, logprob entry per row or None)."""
    B, V = logits.shape
    dev = logits.device
    params = [s.request.params for s in seqs]
    want_lp = [p.logprobs is not None for p in params]
    raw_lp = torch.log_softmax(logits, -1) if any(want_lp) else None
    if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
        logits = logits.clone()
        _apply_penalties(logits, seqs)
    tokens = logits.argmax(-1)
    if not all(p.greedy for p in params):
        greedy = torch.tensor([p.greedy for p in params], device=dev)
        temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
        scaled = logits / temp[:, None]
        if any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in params):
            top_k = torch.tensor([p.top_k or V for p in params], device=dev)
            top_p = torch.tensor([p.top_p for p in params], device=dev)
            min_p = torch.tensor([p.min_p for p in params], device=dev)
            scaled = _filter(scaled, top_k, top_p, min_p)
        seeds = torch.tensor([s.seed for s in seqs], device=dev, dtype=torch.int64)
        steps = torch.tensor([len(s.tokens) - s.prompt_len for s in seqs], device=dev, dtype=torch.int64)
        gumbel = -torch.log(-torch.log(hash_uniform(seeds, steps, V)))
        tokens = torch.where(greedy, tokens, (scaled + gumbel).argmax(-1))
    token_list = tokens.tolist()
    entries: list[dict | None] = [None] * B
    if raw_lp is not None:
        k = max(p.logprobs or 0 for p in params)
        top_v, top_i = raw_lp.topk(k, dim=-1) if k else (None, None)
        chosen = raw_lp.gather(1, tokens[:, None])[:, 0].tolist()
        for i, p in enumerate(params):
            if want_lp[i]:
                n = p.logprobs
                top = list(zip(top_i[i, :n].tolist(), top_v[i, :n].tolist(), strict=False)) if n else []
                entries[i] = {"token_id": token_list[i], "logprob": chosen[i], "top": top}
    return token_list, entries


def prompt_logprob_entries(logits: torch.Tensor, next_ids: list[int], k: int) -> list[dict]:
    """Logprob of each actual next prompt token (rows of `logits` predict `next_ids`) + top k."""
    lp = torch.log_softmax(logits.float(), -1)
    ids = torch.tensor(next_ids, device=lp.device)
    own = lp.gather(1, ids[:, None])[:, 0].tolist()
    top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
    return [{"token_id": t, "logprob": own[j],
             "top": list(zip(top_i[j].tolist(), top_v[j].tolist(), strict=False)) if k else []}
            for j, t in enumerate(next_ids)]
