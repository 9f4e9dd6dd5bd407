"""Prometheus metrics (prefix `lowbit_`), one registry per app so tests can run several servers.

Counters and histograms are updated by the request handlers as tokens reach the client; the engine's
state (running / waiting requests, KV usage, recent generation speed) is read from `engine.stats()`
when Prometheus scrapes, so it is never stale and costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Endpoints get their own label value; anything else is "other", so label cardinality stays bounded.
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0,
                    3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LENGTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class _EngineCollector:
    """Gauges read from the engine at scrape time (absent while the model is loading)."""

    def __init__(self, get_engine: Callable[[], object | None], model_name: Callable[[], str]):
        self.get_engine, self.model_name = get_engine, model_name
        self._info: dict | None = None

    def collect(self):
        engine = self.get_engine()
        if engine is None:
            return
        if self._info is None:
            self._info = engine.info()
        info = GaugeMetricFamily("lowbit_model_info", "The served model (value 1).",
                                 labels=["model", "format", "bits_per_weight", "device", "dtype"])
        info.add_metric([self.model_name(), str(self._info.get("format")), str(self._info.get("bits_per_weight")),
                         str(self._info.get("device")), str(self._info.get("dtype"))], 1.0)
        yield info
        s = engine.stats()
        for name, key, doc in (
            ("lowbit_requests_running", "running", "Requests being decoded or prefilled in the current step."),
            ("lowbit_requests_waiting", "waiting", "Requests waiting to be scheduled."),
            ("lowbit_kv_cache_usage_ratio", "kv_usage", "Fraction of KV cache blocks in use (0 to 1)."),
            ("lowbit_kv_cache_free_blocks", "free_blocks", "KV cache blocks free."),
            ("lowbit_kv_cache_total_blocks", "total_blocks", "KV cache blocks in the pool."),
            ("lowbit_generation_tokens_per_second", "generation_tokens_per_s",
             "Tokens generated per second over the engine's recent window (about 10 s)."),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(s.get(key, 0.0)))
            yield g


class Metrics:
    def __init__(self, get_engine: Callable[[], object | None], model_name: Callable[[], str]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lowbit_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lowbit_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.generation_tokens = Counter("lowbit_generation_tokens", "Generated tokens sent to clients.",
                                         registry=r)
        self.ttft = Histogram("lowbit_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lowbit_inter_token_latency_seconds", "Time between successive tokens of a sequence.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lowbit_e2e_request_latency_seconds", "Time from request arrival to its last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_len = Histogram("lowbit_request_prompt_tokens", "Prompt length of each engine request.",
                                    buckets=_LENGTH_BUCKETS, registry=r)
        self.output_len = Histogram("lowbit_request_generation_tokens",
                                    "Generated tokens of each engine request (all its choices).",
                                    buckets=_LENGTH_BUCKETS, registry=r)
        r.register(_EngineCollector(get_engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: counts every HTTP response by endpoint and status (streaming ones included).

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would wrap streaming bodies and
    interfere with the disconnect detection that cancels abandoned generations.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = {"code": 500}

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
