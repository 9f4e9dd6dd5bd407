"""Acceptance tests of the HTTP server: the official `openai` SDK (and raw HTTP where the SDK hides the
wire) against a live uvicorn server on loopback, serving the default model on the real engine."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from lowbit.config import EngineConfig, ServerConfig
from lowbit.engine import Engine
from lowbit.server import create_app

# the SDK is a dev dependency (installed by `make test`); a bare GPU machine collecting `-m gpu` lacks it
openai = pytest.importorskip("openai", reason="the openai SDK (pip install -e '.[dev]') drives these tests")

MAX_MODEL_LEN = 1024


class LiveServer:
    """uvicorn serving `app` on a free loopback port, in a thread of the test process (so tests can
    also look at the engine directly)."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def engine(smollm2):
    eng = Engine(EngineConfig(kv_cache_blocks=160, max_model_len=MAX_MODEL_LEN, max_num_seqs=32, max_queue=64),
                 model=smollm2)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def live(engine):
    srv = LiveServer(create_app(ServerConfig(api_key=None, max_request_bytes=64 * 1024), engine=engine))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat_ids(engine, messages) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def all_blocks_free(engine) -> bool:
    s = engine.stats()
    return s["free_blocks"] == s["total_blocks"] and s["running"] == 0 and s["waiting"] == 0


def scrape(url: str) -> dict[tuple, float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]


def test_models_health_ready(client, live, engine):
    models = client.models.list()
    assert [m.id for m in models.data] == [engine.model_name] == ["SmolLM2-135M-Instruct"]
    assert client.models.retrieve(engine.model_name).id == engine.model_name
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    assert httpx.get(live.url + "/ready").status_code == 200


def test_chat_streaming_equals_non_streaming_with_exact_usage(client, engine):
    kw = dict(model=engine.model_name, messages=HELLO, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    tokens = choice.logprobs.content
    assert full.usage.prompt_tokens == len(chat_ids(engine, HELLO))
    assert full.usage.completion_tokens == len(tokens) <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    for t in tokens:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 2 and t.logprob <= 0
        assert t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs), abs=1e-5)

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    body, usage = chunks[:-1], chunks[-1]
    assert usage.choices == [] and usage.usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == choice.message.content
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == [choice.finish_reason]
    streamed = [t.token for c in body if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in tokens]


def test_completions_stop_n_logprobs(client, engine):
    prompt = "1, 2, 3, 4,"
    base = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=10, temperature=0,
                                     logprobs=3)
    text = base.choices[0].text
    lp = base.choices[0].logprobs
    assert base.object == "text_completion" and base.choices[0].finish_reason == "length"
    assert base.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert base.usage.completion_tokens == len(lp.tokens) == 10
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for tok, top, val in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs, strict=True):
        assert len(top) == 3 and val == pytest.approx(max(top.values()), abs=1e-5) and top[tok] == val

    # A stop string taken from the greedy output: the text ends right before it.
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]

    # n=2 sampled choices; a list of prompts gives n choices per prompt, indexed prompt-major.
    two = client.completions.create(model=engine.model_name, prompt=[prompt, "The sky is"], n=2, max_tokens=6,
                                    temperature=1.0, seed=7, logprobs=0)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in two.choices)
    assert two.usage.prompt_tokens == 2 * 0 + len(engine.tokenizer.encode(prompt)) + len(
        engine.tokenizer.encode("The sky is"))


def test_completions_echo_prompt_logprobs_are_the_models(client, engine, smollm2):
    prompt = "The capital of France is Paris"
    ids = engine.tokenizer.encode(prompt)
    score = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                      temperature=0)
    c = score.choices[0]
    assert c.text == prompt and score.usage.completion_tokens == 0 and score.usage.prompt_tokens == len(ids)
    assert c.logprobs.tokens == [engine.tokenizer.decode([t]) for t in ids]
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    want = torch.log_softmax(smollm2.logits(torch.tensor([ids]))[0].float(), -1)
    for j in range(1, len(ids)):
        assert c.logprobs.token_logprobs[j] == pytest.approx(float(want[j - 1, ids[j]]), abs=2e-3)
    # echo with generation: prompt then completion; token-id prompts give the same result.
    gen = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=4, echo=True, temperature=0)
    by_ids = client.completions.create(model=engine.model_name, prompt=ids, max_tokens=4, echo=True, temperature=0)
    assert gen.choices[0].text.startswith(prompt) and len(gen.choices[0].text) > len(prompt)
    assert by_ids.choices[0].text == gen.choices[0].text


def test_seed_reproducible_streaming_or_not(client, engine):
    kw = dict(model=engine.model_name, messages=HELLO, max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**kw, seed=1234, stream=True))
    other = client.chat.completions.create(**kw, seed=99).choices[0].message.content
    assert a == b == streamed
    assert other != a


PROMPTS = ["The sky is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,", "The capital of France is",
           "Water boils at", "My favourite food is", "import numpy as np"]


def test_16_concurrent_streams_equal_each_alone(live, engine):
    def stream(prompt):
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
        parts = c.completions.create(model=engine.model_name, prompt=prompt, max_tokens=10, temperature=0,
                                     stream=True, extra_body={"ignore_eos": True})
        return "".join(p.choices[0].text for p in parts)

    requests = PROMPTS + PROMPTS[::-1]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, requests))
    assert engine.stats()["generation_tokens_total"] > 0
    alone = {p: stream(p) for p in PROMPTS}
    assert together == [alone[p] for p in requests]
    wait_for(lambda: all_blocks_free(engine), what="KV blocks to be returned")


def test_cancelled_streams_return_all_kv_blocks(live, engine, client):
    body = {"model": engine.model_name, "prompt": "Once upon a time", "max_tokens": 500, "stream": True,
            "temperature": 0, "ignore_eos": True}

    def read_then_drop(_):
        with httpx.Client(timeout=60) as h, h.stream("POST", live.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data: ")]
            assert engine.stats()["free_blocks"] < engine.stats()["total_blocks"]
            return len(got)

    with ThreadPoolExecutor(4) as pool:
        assert all(n >= 2 for n in pool.map(read_then_drop, range(4)))
    wait_for(lambda: all_blocks_free(engine), what="cancelled streams to release their blocks")
    # A non-streaming request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json={**body, "stream": False}, timeout=1.5)
    wait_for(lambda: all_blocks_free(engine), what="an abandoned non-streaming request to be cancelled")
    assert client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def _long_ids(n):
    return [504] * n


BAD = [
    # (path, raw body or json, status, param, code)
    ("/v1/chat/completions", b'{"model": "x", "messages": [', 400, None, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "invalid_value"),
    ("/v1/chat/completions", {"max_tokens": 3}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content", None),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": HELLO}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": -1}, 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", {"messages": HELLO, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 0}, 400, "n", "invalid_value"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {"messages": HELLO, "presence_penalty": 3}, 400, "presence_penalty", "invalid_value"),
    ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"messages": HELLO, "stream": "yes"}, 400, "stream", "invalid_value"),
    ("/v1/chat/completions", {"messages": HELLO, "seed": 1.5}, 400, "seed", "invalid_value"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": [""]}, 400, "stop", None),
    ("/v1/chat/completions", {"messages": HELLO, "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1100}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": _long_ids(MAX_MODEL_LEN)}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"prompt": 42}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": [10 ** 9]}, 400, None, "invalid_value"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 50}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"50": 5}}, 400, "logit_bias", None),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_gets_4xx_with_openai_error_body(live, path, body, status, param, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(live.url + path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert err["param"] == param and (code is None or err["code"] == code), err


def test_oversized_unknown_and_wrong_method_requests(live, client, engine):
    big = json.dumps({"prompt": "x" * (65 * 1024)}).encode()
    r = httpx.post(live.url + "/v1/completions", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(live.url + "/v1/completions", content=iter([big[:40000], big[40000:]]))  # chunked: no length
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(live.url + "/v1/chat/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=engine.model_name, messages=[], max_tokens=2)
    # None of it hurt the server.
    assert client.chat.completions.create(model=engine.model_name, messages=HELLO, max_tokens=2).choices


def test_internal_error_fails_only_that_request(live, engine, client, monkeypatch):
    execute = engine.runner.execute
    calls = {"n": 0}

    def failing(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return execute(batch)

    monkeypatch.setattr(engine.runner, "execute", failing)
    with httpx.Client(timeout=60) as h, h.stream("POST", live.url + "/v1/chat/completions", json={
            "messages": HELLO, "max_tokens": 20, "temperature": 0, "stream": True, "ignore_eos": True}) as r:
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    calls["n"] = -100
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
    assert r.status_code == 200  # still serving
    calls["n"] = 2
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    wait_for(lambda: all_blocks_free(engine), what="failed requests to release their blocks")
    assert client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=3).usage.completion_tokens == 3


def test_metrics_parse_and_count_exactly_the_tokens_served(live, engine, client):
    wait_for(lambda: all_blocks_free(engine), what="an idle engine")
    before = scrape(live.url)
    usages = [client.chat.completions.create(model=engine.model_name, messages=HELLO, max_tokens=5).usage]
    stream = client.completions.create(model=engine.model_name, prompt=PROMPTS[:2], n=2, max_tokens=4, stream=True,
                                       stream_options={"include_usage": True}, temperature=0.7, seed=3)
    usages.append([c for c in stream][-1].usage)
    usages.append(client.completions.create(model=engine.model_name, prompt="Hello there", max_tokens=0, echo=True,
                                            logprobs=0).usage)
    key = ("lowbit_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    wait_for(lambda: scrape(live.url)[key] - before.get(key, 0) == 1, what="the request counter")
    after = scrape(live.url)

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("lowbit_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("lowbit_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("lowbit_requests_total", (("endpoint", "/v1/completions"), ("status", "200"))) == 2
    assert delta("lowbit_request_prompt_tokens_count") == 4  # one per engine request (prompt)
    assert delta("lowbit_e2e_request_latency_seconds_count") == 4
    assert delta("lowbit_time_to_first_token_seconds_count") == 3  # one per HTTP request
    assert delta("lowbit_inter_token_latency_seconds_count") > 0
    for gauge in ("lowbit_requests_running", "lowbit_requests_waiting", "lowbit_kv_cache_usage_ratio",
                  "lowbit_generation_tokens_per_second"):
        assert (gauge, ()) in after
    assert after[("lowbit_kv_cache_usage_ratio", ())] == 0.0
    assert after[("lowbit_generation_tokens_per_second", ())] > 0



def test_grafana_dashboard_plots_only_metrics_the_server_exports(live):
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parents[1] / "docker/grafana/lowbit.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"lowbit_[a-z0-9_]+", e)}
    assert httpx.get(live.url + "/v1/models").status_code == 200  # labelled counters appear once used
    exported = {name for name, _ in scrape(live.url)}
    assert used and used <= exported, used - exported

def _extra_server(smollm2, **engine_kw):
    eng = Engine(EngineConfig(**engine_kw), model=smollm2)
    return eng, LiveServer(create_app(ServerConfig(api_key=None), engine=eng))


def _post_and_give_up(url, body, timeout):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=timeout)


def test_overload_gets_429_with_retry_after(smollm2, live):
    eng, srv = _extra_server(smollm2, kv_cache_blocks=32, max_num_seqs=1, max_num_batched_tokens=64, max_queue=1)
    body = {"prompt": "Once upon a time", "max_tokens": 400, "stream": True, "ignore_eos": True}
    try:
        with httpx.Client(timeout=60) as a, a.stream("POST", srv.url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # (keep the iterator: dropping it closes the connection)
            next(lines)  # A is running (max_num_seqs=1)
            waiter = threading.Thread(target=_post_and_give_up, args=(srv.url + "/v1/completions", {**body, "stream": False}, 3.0))
            waiter.start()  # B waits in the queue, then gives up after 3 s
            wait_for(lambda: eng.stats()["waiting"] == 1, what="a waiting request")
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
        waiter.join()
        wait_for(lambda: all_blocks_free(eng), what="the overloaded engine to drain")
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        srv.stop()
        eng.shutdown()


def test_api_key_guards_v1_only(smollm2):
    eng = Engine(EngineConfig(kv_cache_blocks=8), model=smollm2)
    srv = LiveServer(create_app(ServerConfig(api_key="sekrit"), engine=eng))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0)
        assert ok.models.list().data[0].id == eng.model_name
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 200
    finally:
        srv.stop()
        eng.shutdown()


def test_ready_is_503_until_the_engine_is_loaded(smollm2):
    release = threading.Event()
    loaded = []

    stopped = []

    def factory():
        release.wait(30)
        eng = Engine(EngineConfig(kv_cache_blocks=8), model=smollm2)
        shutdown = eng.shutdown
        eng.shutdown = lambda: (stopped.append(True), shutdown())
        return eng

    app = create_app(ServerConfig(api_key=None), engine_factory=factory, on_ready=lambda e, err: loaded.append(e))
    srv = LiveServer(app)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        for path in ("/ready", "/v1/models"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 503
        release.set()
        wait_for(lambda: httpx.get(srv.url + "/ready").status_code == 200, what="readiness")
        assert loaded and loaded[0].model_name == "SmolLM2-135M-Instruct"
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    finally:
        srv.stop()
    assert stopped == [True]  # the app built this engine, so it shut it down


def test_load_generator_short_run(live, engine, tmp_path):
    from load_tests import loadgen

    wait_for(lambda: all_blocks_free(engine), what="an idle engine")
    out = tmp_path / "load.json"
    rc = loadgen.main(["--url", live.url, "--clients", "8", "--duration", "5", "--prompt-tokens", "8-24",
                       "--output-tokens", "4-12", "--check-metrics", "--json", str(out)])
    report = json.loads(out.read_text())
    q = report["requests"]
    assert rc == 0 and report["passed"], report
    assert q["failed"] == 0 and q["errors"] == {} and q["accounted"] and q["started"] == q["ok"] >= 8
    assert report["server_metrics"]["matches"]
    assert report["throughput"]["output_tok_s"] > 0 and report["ttft_s"]["n"] == q["ok"]
    wait_for(lambda: all_blocks_free(engine), what="the load to drain")


def test_load_generator_concurrency_sweep(live, engine, tmp_path, capsys):
    from load_tests import loadgen

    wait_for(lambda: all_blocks_free(engine), what="an idle engine")
    out = tmp_path / "sweep.json"
    rc = loadgen.main(["--url", live.url, "--clients", "1,4", "--requests", "4", "--prompt-tokens", "8",
                       "--output-tokens", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["passed"] and [r["clients"] for r in result["sweep"]] == [1, 4]
    assert all(r["requests"]["ok"] == 4 and r["tokens"]["completion"] == 12 for r in result["sweep"])
    table = capsys.readouterr().out
    assert "| clients |" in table and "\n| 4 | 4 | 0 |" in table
