"""Incremental detokenization with stop strings.

Decoding the whole output every step is quadratic, and decoding tokens one at a time splits
multi-byte characters and drops the spaces that SentencePiece-style tokenizers attach to the next
token. So, as vLLM does, we decode a short window of already-emitted tokens plus the new ones and
keep only the text beyond the window's old text; a window ending in U+FFFD (an incomplete UTF-8
sequence) waits for more tokens.

Stop strings: the text is cut before the first stop string, and the visible text holds back any
tail that could still grow into one.

Speed: under 64 streams the engine detokenizes 64 tokens a step on the host while the GPU waits.
transformers' `decode` wrapper cost ~4x the Rust decode it calls (H100 host, benchmarks/RESULTS.md
ninth session), so a fast tokenizer without post-decode clean-up is called directly.
"""

from __future__ import annotations

_WINDOW = 6  # tokens of left context re-decoded with each new token


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = list(prompt_ids[-_WINDOW:])  # context for the first output tokens
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stopped = False

        backend = getattr(tokenizer, "backend_tokenizer", None)
        direct = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._decode_fn = backend.decode if direct else tokenizer.decode if tokenizer is not None else None

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> bool:
        """Append one generated token; returns True when a stop string appeared (text cut before it)."""
        if self.tokenizer is None or self.stopped:
            return False
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return False  # incomplete character or nothing printable yet: wait
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def visible_text(self, finished: bool) -> str:
        """The text safe to show: all of it once finished, else without a possible stop-string start."""
        if finished or not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self.text[:len(self.text) - hold]
