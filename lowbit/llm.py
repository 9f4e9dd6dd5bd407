"""Offline batched generation on the serving engine: `lowbit.LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import os

from .config import EngineConfig
from .engine.engine import Engine
from .engine.outputs import RequestOutput
from .engine.sampling_params import SamplingParams
from .quantized_models.llama import CausalLM

__all__ = ["LLM", "SamplingParams"]


class LLM:
    """All prompts of one `generate` call are batched together by the engine's scheduler."""

    def __init__(self, model: CausalLM | str | os.PathLike | None = None, **settings):
        if isinstance(model, CausalLM):
            self.engine = Engine(EngineConfig(**settings), model=model)
        else:
            self.engine = Engine(EngineConfig(model=None if model is None else str(model), **settings))
        self.model = self.engine.model
        self.tokenizer = self.engine.tokenizer

    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids, or load it with tokenizer=...")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None,
                 ) -> list[RequestOutput]:
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        reqs = [self.engine.make_request(self._ids(p), params, str(i), p if isinstance(p, str) else None)
                for i, p in enumerate(prompts)]
        return self.engine.run(reqs)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        return self.generate([list(ids)], params)[0]
