"""Shared test helpers: where the team's golden fixtures live, and the default model's GGUF file."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

# Without a GPU, Triton kernels run in Triton's interpreter. The variable is read when a kernel is
# decorated, so it must be set before any lowbit kernel module is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("LOWBIT_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def fixture_dir(name: str) -> Path:
    """`../shared/fixtures/<name>`, or skip the test with the reason when it is absent."""
    d = FIXTURES / name
    if not d.is_dir():
        pytest.skip(f"golden fixtures not found at {d} (the team's ../shared/fixtures folder is absent)")
    return d


@pytest.fixture(scope="session")
def smollm2():
    """The default model (SmolLM2-135M-Instruct GGUF) loaded once on CPU in float32."""
    import torch

    import lowbit

    return lowbit.load_model(device="cpu", dtype=torch.float32)


def kernel_module(modname: str):
    """A Triton kernel module, interpreted when there is no GPU. Triton picks compiled or
    interpreted when a kernel is decorated, so a module imported earlier without TRITON_INTERPRET
    is reloaded."""
    mod = importlib.import_module(modname)
    try:
        import torch
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return mod
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        if not any(isinstance(v, InterpretedFunction) for v in vars(mod).values()):
            mod = importlib.reload(mod)
    return mod
