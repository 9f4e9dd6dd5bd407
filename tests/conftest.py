"""Shared test helpers: where the team's golden fixtures live, and the default model's GGUF file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("LOWBIT_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def fixture_dir(name: str) -> Path:
    """`../shared/fixtures/<name>`, or skip the test with the reason when it is absent."""
    d = FIXTURES / name
    if not d.is_dir():
        pytest.skip(f"golden fixtures not found at {d} (the team's ../shared/fixtures folder is absent)")
    return d
