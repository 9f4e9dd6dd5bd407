"""The load generator's scenario for locust: users sending streaming chat requests back to back.

    pip install locust
    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 32 -t 30s

Each request is reported as "chat stream" (end-to-end time, failed unless the stream is complete:
content, finish_reason, usage and [DONE]), with its time to first token as a separate "TTFT" entry.
Lengths come from LOWBIT_PROMPT_TOKENS / LOWBIT_OUTPUT_TOKENS (same syntax as loadgen: N, A-B,
normal:MEAN:STD); LOWBIT_MODEL and LOWBIT_API_KEY are optional. Loopback hosts only, unless
LOWBIT_ALLOW_REMOTE=1.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, constant, task
from locust.exception import StopUser

from load_tests.loadgen import Distribution, is_loopback, make_prompt

PROMPT_TOKENS = Distribution(os.environ.get("LOWBIT_PROMPT_TOKENS", "32-128"))
OUTPUT_TOKENS = Distribution(os.environ.get("LOWBIT_OUTPUT_TOKENS", "16-64"))


class ChatStreamUser(HttpUser):
    wait_time = constant(0)  # back to back, as loadgen's clients

    def on_start(self):
        if not is_loopback(self.host) and os.environ.get("LOWBIT_ALLOW_REMOTE") != "1":
            raise StopUser(f"{self.host} is not a loopback address (set LOWBIT_ALLOW_REMOTE=1 to allow it)")
        self.rng = random.Random()
        key = os.environ.get("LOWBIT_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = os.environ.get("LOWBIT_MODEL") or self.client.get(
            "/v1/models", headers=self.headers).json()["data"][0]["id"]

    @task
    def chat_stream(self):
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": make_prompt(self.rng, PROMPT_TOKENS.sample(self.rng))}],
                "max_tokens": OUTPUT_TOKENS.sample(self.rng), "temperature": 0.8, "ignore_eos": True}
        start = time.perf_counter()
        first = None
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, stream=True,
                              catch_response=True, name="chat stream") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            done, usage, finish = False, None, None
            for line in resp.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    resp.failure(f"stream error: {chunk['error']}")
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    if first is None and choice.get("delta", {}).get("content"):
                        first = time.perf_counter()
                    finish = choice.get("finish_reason") or finish
            if not (done and usage and finish):
                resp.failure(f"incomplete stream: done={done} usage={usage} finish_reason={finish}")
                return
            resp.success()
        if first is not None:
            self.environment.events.request.fire(
                request_type="TTFT", name="chat stream", response_time=(first - start) * 1e3,
                response_length=usage["completion_tokens"], exception=None, context={})
