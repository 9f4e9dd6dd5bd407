"""Reading checkpoint files: config.json plus safetensors (sharded or not), never pickle."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .linear import CheckpointError


class Checkpoint:
    """A checkpoint as lowbit reads it: HF-style config dict and tensors by HF-style name."""

    hf_config: Mapping[str, Any]
    directory: Path

    def names(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def linear_format(self, module_name: str) -> tuple[str, Mapping[str, Any] | None] | None:
        """Format and config for a Linear when the container itself decides (GGUF); None: ask config.json."""
        return None

    @property
    def nbytes(self) -> int:
        return 0


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, directory: Path):
        self.directory = directory
        self.hf_config = read_json(directory / "config.json", "config.json")
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map'")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {directory} (lowbit never loads pickled .bin weights)")
        self._handles = {}
        self._where: dict[str, str] = {}
        for fname in files:
            path = directory / fname
            if not path.exists():
                raise CheckpointError(f"shard {fname} named in the index is missing from {directory}")
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"cannot read {path}: corrupt or not a safetensors file ({e})") from None
            self._handles[fname] = h
            for k in h.keys():
                self._where[k] = fname
        self._nbytes = sum((directory / f).stat().st_size for f in files)

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except KeyError:
            raise CheckpointError(f"missing tensor {name}") from None
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self._where[name]}: {e}") from None

    @property
    def nbytes(self) -> int:
        return self._nbytes
