"""POST /v1/chat/completions: messages through the tokenizer's chat template, then generation.

Streams follow OpenAI: each choice opens with a chunk whose delta is `{"role": "assistant",
"content": ""}`, then content deltas, and its last chunk carries `finish_reason`.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from starlette.responses import JSONResponse, Response

from .errors import bad_request
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    TokenLogprob,
    TopLogprob,
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


def chat_prompt_ids(tokenizer, req: ChatCompletionRequest) -> list[int]:
    """Render the messages with the tokenizer's chat template and tokenize the result."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=req.add_generation_prompt)
    except Exception as e:  # the template's own checks (e.g. role order) raise jinja errors
        raise bad_request(f"the chat template rejected these messages: {e}", "messages") from None
    # The template already wrote the special tokens (BOS, role markers); do not add them twice.
    return tokenizer.encode(text, add_special_tokens=False)


def _token_logprobs(token_ids: list[int], entries: list[dict], token_text: TokenText) -> list[TokenLogprob]:
    out = []
    for t, e in zip(token_ids, entries, strict=True):
        s = token_text(t)
        top = [TopLogprob(token=token_text(a), logprob=finite(v), bytes=list(token_text(a).encode()))
               for a, v in e["top"]]
        out.append(TokenLogprob(token=s, logprob=finite(e["logprob"]), bytes=list(s.encode()), top_logprobs=top))
    return out


async def create_chat_completion(state: ServerState, request: Request, body: bytes) -> Response:
    arrival = time.monotonic()
    req: ChatCompletionRequest = parse(ChatCompletionRequest, body)
    engine = state.require_engine()
    state.check_model(req.model)
    ids = chat_prompt_ids(engine.tokenizer, req)
    max_tokens = req.output_limit()
    check_context(len(ids), max_tokens, engine.max_model_len, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_tokens, logprobs=logprobs)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    run = GenerationRun(engine, state.metrics, [ids], params, rid, arrival)
    created = int(time.time())
    token_text = TokenText(engine.tokenizer)
    try:
        await until_disconnected(request, run.start())
        if req.stream:
            return SSEResponse(_stream(req, run, rid, created, state.model_name, token_text))
        (out,) = await until_disconnected(request, run.collect())
    except BaseException:
        await run.close()
        raise
    choices = []
    for c in out.outputs:
        lp = None
        if req.logprobs:
            lp = ChatLogprobs(content=_token_logprobs(c.token_ids, c.logprobs or [], token_text))
        choices.append(ChatChoice(index=c.index, message=ChatMessageOut(content=c.text), logprobs=lp,
                                  finish_reason=c.finish_reason))
    completion = run.completion_tokens(0)
    usage = Usage(prompt_tokens=len(ids), completion_tokens=completion, total_tokens=len(ids) + completion)
    resp = ChatCompletionResponse(id=rid, created=created, model=state.model_name, choices=choices, usage=usage)
    return JSONResponse(resp.model_dump(mode="json"))


async def _stream(req: ChatCompletionRequest, run: GenerationRun, rid: str, created: int, model: str,
                  token_text: TokenText):
    exclude = None if req.include_usage else {"usage"}

    def chunk(index: int, delta: dict, lp=None, finish=None) -> bytes:
        return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[
            ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish)]), exclude)

    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    sent_text = [0] * req.n
    sent_tokens = [0] * req.n
    done = [False] * req.n
    async for _, out in run.outputs():
        for c in out.outputs:
            if done[c.index]:
                continue
            text = c.text[sent_text[c.index]:]
            lp = None
            if req.logprobs and len(c.token_ids) > sent_tokens[c.index]:
                k = sent_tokens[c.index]
                lp = ChatLogprobs(content=_token_logprobs(c.token_ids[k:], (c.logprobs or [])[k:], token_text))
            sent_text[c.index] += len(text)
            sent_tokens[c.index] = len(c.token_ids)
            done[c.index] = c.finish_reason is not None
            if text or lp or c.finish_reason is not None:
                yield chunk(c.index, {"content": text} if text else {}, lp, c.finish_reason)
    if req.include_usage:
        prompt = len(run.prompts[0])
        completion = run.completion_tokens(0)
        yield sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)))
