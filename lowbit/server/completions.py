"""POST /v1/completions: text or token-id prompts (one or many), `n`, `stop`, `logprobs`, `echo`.

`echo` with `logprobs` returns the prompt's own token logprobs first (the first token has none), which
is how evaluation harnesses such as lm-eval's local-completions score text; `max_tokens=0` with `echo`
scores the prompt alone.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from starlette.responses import JSONResponse, Response

from .errors import bad_request
from .protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    parse,
)
from .serving import (
    GenerationRun,
    ServerState,
    TokenText,
    check_context,
    finite,
    sampling_params,
    until_disconnected,
)
from .streaming import SSEResponse, sse


class _LogprobWriter:
    """Appends tokens to a choice's CompletionLogprobs with running text offsets."""

    def __init__(self, token_text: TokenText, offset: int = 0):
        self.token_text, self.offset = token_text, offset

    def add(self, lp: CompletionLogprobs, token_id: int, entry: dict | None) -> None:
        text = self.token_text(token_id)
        lp.tokens.append(text)
        lp.text_offset.append(self.offset)
        self.offset += len(text)
        if entry is None:  # the first prompt token: nothing before it to condition on
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
            return
        lp.token_logprobs.append(finite(entry["logprob"]))
        lp.top_logprobs.append({self.token_text(t): finite(v) for t, v in entry["top"]})


async def create_completion(state: ServerState, request: Request, body: bytes) -> Response:
    arrival = time.monotonic()
    req: CompletionRequest = parse(CompletionRequest, body)
    engine = state.require_engine()
    state.check_model(req.model)
    tok = engine.tokenizer
    prompt_ids: list[list[int]] = []
    prompt_texts: list[str] = []
    for p in req.prompt_list():
        if isinstance(p, str):
            if tok is None:
                raise bad_request("this model has no tokenizer: send the prompt as token ids", "prompt")
            ids = tok.encode(p)
            if not ids:
                raise bad_request("prompt must not be empty", "prompt")
            prompt_ids.append(ids)
            prompt_texts.append(p)
        else:
            prompt_ids.append(list(p))
            prompt_texts.append(tok.decode(p) if (req.echo and tok is not None) else "")
    score_only = req.max_tokens == 0  # echo with max_tokens=0: the prompt's logprobs, nothing generated
    max_tokens = 1 if score_only else req.max_tokens
    for ids in prompt_ids:
        check_context(len(ids), max_tokens, engine.max_model_len, "prompt")
    want_prompt_lp = req.echo and req.logprobs is not None
    params = sampling_params(req, max_tokens, logprobs=req.logprobs,
                             prompt_logprobs=req.logprobs if want_prompt_lp else None)
    rid = f"cmpl-{uuid.uuid4().hex}"
    run = GenerationRun(engine, state.metrics, prompt_ids, params, rid, arrival, count_output=not score_only)
    created = int(time.time())
    token_text = TokenText(tok)
    try:
        await until_disconnected(request, run.start())
        if req.stream:
            return SSEResponse(_stream(req, run, rid, created, state.model_name, prompt_texts, token_text))
        outs = await until_disconnected(request, run.collect())
    except BaseException:
        await run.close()
        raise

    choices = []
    for i, out in enumerate(outs):
        for c in out.outputs:
            text, lp = _choice_start(req, out, prompt_texts[i], token_text)
            finish = c.finish_reason
            if score_only:
                finish = "length"
            else:
                text += c.text
                if lp is not None:
                    writer = _LogprobWriter(token_text, len(text) - len(c.text))
                    for t, e in zip(c.token_ids, c.logprobs or [], strict=True):
                        writer.add(lp, t, e)
            choices.append(CompletionChoice(index=i * req.n + c.index, text=text, logprobs=lp, finish_reason=finish))
    usage = _usage(run)
    resp = CompletionResponse(id=rid, created=created, model=state.model_name, choices=choices, usage=usage)
    return JSONResponse(resp.model_dump(mode="json"))


def _usage(run: GenerationRun) -> Usage:
    prompt = sum(len(p) for p in run.prompts)
    completion = sum(run.completion_tokens(i) for i in range(len(run.prompts)))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _choice_start(req: CompletionRequest, out, prompt_text: str, token_text: TokenText
                  ) -> tuple[str, CompletionLogprobs | None]:
    """The echoed prompt (text and, with logprobs, its tokens) that begins a choice."""
    lp = CompletionLogprobs() if req.logprobs is not None else None
    if not req.echo:
        return "", lp
    if lp is not None:
        writer = _LogprobWriter(token_text)
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        for t, e in zip(out.prompt_token_ids, entries, strict=True):
            writer.add(lp, t, e)
    return prompt_text, lp


async def _stream(req: CompletionRequest, run: GenerationRun, rid: str, created: int, model: str,
                  prompt_texts: list[str], token_text: TokenText):
    exclude = None if req.include_usage else {"usage"}
    progress: dict[int, list] = {}  # choice index -> [text sent, logprob entries sent, text offset, done]
    async for i, out in run.outputs():
        for c in out.outputs:
            index = i * req.n + c.index
            st = progress.get(index)
            text, lp = "", None
            if st is None:
                text, lp = _choice_start(req, out, prompt_texts[i], token_text)
                st = progress[index] = [0, 0, len(text), False]
            if st[3]:
                continue
            finish = c.finish_reason
            if run.count_output:
                new_text = c.text[st[0]:]
                entries = (c.logprobs or [])[st[1]:]
                if req.logprobs is not None:
                    lp = lp or CompletionLogprobs()
                    writer = _LogprobWriter(token_text, st[2])
                    for t, e in zip(c.token_ids[st[1]:], entries, strict=True):
                        writer.add(lp, t, e)
                    st[2] = writer.offset
                text += new_text
                st[0] += len(new_text)
                st[1] += len(entries)
            elif finish is not None:
                finish = "length"
            if finish is not None:
                st[3] = True
            if not text and finish is None and not (lp and lp.tokens):
                continue
            chunk = CompletionResponse(id=rid, created=created, model=model, choices=[
                CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish)])
            yield sse(chunk, exclude)
    if req.include_usage:
        yield sse(CompletionResponse(id=rid, created=created, model=model, choices=[], usage=_usage(run)))
