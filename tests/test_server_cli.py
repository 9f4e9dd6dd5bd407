"""`lowbit serve` flags and the load generator's helpers (no model needed), and the slow end-to-end run:
a real `lowbit serve` process with the default model under 32 concurrent streaming clients for 30 s."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from load_tests import loadgen
from lowbit import cli
from lowbit.config import EngineConfig, ServerConfig
from lowbit.server.cli import configs_from_args, startup_line

ROOT = Path(__file__).resolve().parents[1]


def serve_parser():
    """The `serve` sub-parser exactly as `lowbit` registers it."""
    sub = cli.argparse.ArgumentParser().add_subparsers(dest="command")
    cli._add_optional_commands(sub)
    return sub.choices["serve"]


def parse_serve(argv: list[str]):
    return serve_parser().parse_args(argv)


def test_every_config_field_is_a_flag_with_the_dataclass_default(monkeypatch):
    monkeypatch.delenv("LOWBIT_API_KEY", raising=False)
    engine, server = configs_from_args(parse_serve([]))
    assert engine == EngineConfig() and server == ServerConfig()
    argv = ["--model", "m.gguf", "--device", "cpu", "--dtype", "float32", "--max-model-len", "512",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "256", "--max-queue", "3", "--kv-cache-blocks", "99",
            "--gpu-memory-utilization", "0.5", "--block-size", "32", "--tokenizer", "tok", "--no-cuda-graphs",
            "--cuda-graph-max-tokens", "512",
            "--served-model-name", "smol", "--host", "0.0.0.0", "--port", "9001", "--api-key", "k",
            "--max-request-bytes", "1000"]
    engine, server = configs_from_args(parse_serve(argv))
    assert engine == EngineConfig(model="m.gguf", device="cpu", dtype="float32", max_model_len=512, max_num_seqs=4,
                                  max_num_batched_tokens=256, max_queue=3, kv_cache_blocks=99,
                                  gpu_memory_utilization=0.5, block_size=32, tokenizer="tok", cuda_graphs=False,
                                  cuda_graph_max_tokens=512)
    assert server == ServerConfig(host="0.0.0.0", port=9001, served_model_name="smol", api_key="k",
                                  max_request_bytes=1000)
    fields = {f.name for cls in (EngineConfig, ServerConfig) for f in dataclasses.fields(cls)}
    assert fields <= {a.dest for a in serve_parser()._actions}


def test_api_key_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("LOWBIT_API_KEY", "from-env")
    assert configs_from_args(parse_serve([]))[1].api_key == "from-env"
    assert configs_from_args(parse_serve(["--api-key", "flag"]))[1].api_key == "flag"


def test_invalid_settings_exit_2_before_loading(capsys):
    assert cli.main(["serve", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs must be >= 1" in capsys.readouterr().err


def test_startup_line_names_url_model_format_bits_and_kv_capacity():
    info = {"format": "gguf", "bits_per_weight": 5.0, "kv_blocks": 255, "block_size": 16, "kv_tokens": 4080,
            "device": "cpu", "dtype": "float32", "max_model_len": 4080, "max_num_seqs": 64}
    line = startup_line(ServerConfig(host="127.0.0.1", port=8000), "SmolLM2-135M-Instruct", info)
    for part in ("http://127.0.0.1:8000/v1", "SmolLM2-135M-Instruct", "format gguf", "5.00 bits/weight",
                 "4080 tokens", "255 blocks"):
        assert part in line


def test_length_distributions_and_percentiles():
    rng = random.Random(0)
    assert {loadgen.Distribution("7").sample(rng) for _ in range(10)} == {7}
    u = [loadgen.Distribution("3-5").sample(rng) for _ in range(200)]
    assert set(u) == {3, 4, 5}
    assert min(loadgen.Distribution("normal:2:10").sample(rng) for _ in range(200)) == 1
    for bad in ("0", "5-3", "x", "normal:1"):
        with pytest.raises(loadgen.argparse.ArgumentTypeError):
            loadgen.Distribution(bad)
    p = loadgen.percentiles([float(x) for x in range(1, 101)])
    assert p["n"] == 100 and p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)
    assert p["max"] == 100 and loadgen.percentiles([]) == {"n": 0}


def test_loadgen_refuses_remote_hosts_and_bounds_its_load():
    for url in ("http://127.0.0.1:1", "http://localhost:8000", "http://[::1]:80"):
        assert loadgen.parse_args(["--url", url]).duration == 30.0
    for argv in (["--url", "http://example.com"], ["--clients", "0"], ["--clients", "5000"], ["--duration", "0"],
                 ["--requests", "0"]):
        with pytest.raises(SystemExit):
            loadgen.parse_args(argv)
    assert loadgen.parse_args(["--url", "http://10.0.0.1", "--allow-remote", "--requests", "5"]).duration is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_lowbit_serve_process_under_32_clients_for_30_s(tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LOWBIT_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--kv-cache-blocks", "1024", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while "lowbit: serving" not in Path(log.name).read_text():
            assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.5)
        line = next(ln for ln in Path(log.name).read_text().splitlines() if ln.startswith("lowbit: serving"))
        assert f"http://127.0.0.1:{port}/v1" in line and "SmolLM2-135M-Instruct" in line and "bits/weight" in line
        assert httpx.get(url + "/ready").status_code == 200
        out = tmp_path / "load.json"
        rc = loadgen.main(["--url", url, "--clients", "32", "--duration", "30", "--prompt-tokens", "16-64",
                           "--output-tokens", "8-32", "--check-metrics", "--json", str(out)])
        report = json.loads(out.read_text())
        q = report["requests"]
        assert rc == 0 and report["passed"], report
        assert q["failed"] == 0 and q["accounted"] and q["started"] == q["ok"] >= 32
        assert report["server_metrics"]["matches"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: graceful shutdown, exit status 0
        proc.wait(timeout=60)
        log.close()
    text = Path(log.name).read_text()
    assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]
