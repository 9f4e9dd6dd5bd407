"""GGUF import: llama.cpp's single-file format read with the `gguf` package, shown as HF-style tensors.

Linear weights in Q4_0 / Q4_1 / Q8_0 stay at their bit width (the "gguf" uniform format); every
other type is dequantized with a log line. The tokenizer and chat template come from the file's
metadata through transformers, converted once and cached because the conversion takes seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .linear import CheckpointError

log = logging.getLogger("lowbit")

NATIVE_TYPES = ("Q4_0", "Q4_1", "Q8_0")
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (interleaved rotary -> rotate-half)."""
    half = n_rows // n_head // 2
    return torch.arange(n_rows).view(n_head, half, 2).transpose(1, 2).reshape(-1)


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path, native: bool = True):
        import gguf

        self.path = Path(path)
        self.directory = self.path.parent
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:
            raise CheckpointError(f"cannot read GGUF file {self.path}: {e}") from None
        self._gguf = gguf
        self._fields = {k: f for k, f in self.reader.fields.items()}
        arch = self._meta("general.architecture")
        if arch not in _ARCHS:
            raise CheckpointError(f"unsupported GGUF architecture {arch!r}; lowbit reads {', '.join(_ARCHS)}")
        self.arch = arch
        self._tensors = {}
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                raise CheckpointError(f"GGUF tensor {t.name!r} has no place in a {arch} model "
                                      "(rope_freqs and other extras are not supported)")
            self._tensors[name] = t
        self.hf_config = self._config()
        self.native = native
        self._logged: set[str] = set()

    def _meta(self, key, default=None):
        f = self._fields.get(key)
        return default if f is None else f.contents()

    def _config(self) -> dict:
        a = self.arch
        tokens = self._meta("tokenizer.ggml.tokens") or []
        heads = int(self._meta(f"{a}.attention.head_count"))
        hidden = int(self._meta(f"{a}.embedding_length"))
        return {
            "architectures": [_ARCHS[a]],
            "vocab_size": int(self._meta(f"{a}.vocab_size", len(tokens))),
            "hidden_size": hidden,
            "intermediate_size": int(self._meta(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self._meta(f"{a}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._meta(f"{a}.attention.head_count_kv", heads)),
            "head_dim": int(self._meta(f"{a}.attention.key_length", hidden // heads)),
            "rms_norm_eps": float(self._meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._meta(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._meta(f"{a}.context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self._meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._meta("tokenizer.ggml.eos_token_id"),
        }

    def names(self) -> set[str]:
        return set(self._tensors)

    def _type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def _row_order(self, name: str) -> torch.Tensor | None:
        if self.arch != "llama":
            return None
        c = self.hf_config
        if name.endswith("self_attn.q_proj.weight"):
            return _unpermute_rows(c["num_attention_heads"] * c["head_dim"], c["num_attention_heads"])
        if name.endswith("self_attn.k_proj.weight"):
            return _unpermute_rows(c["num_key_value_heads"] * c["head_dim"], c["num_key_value_heads"])
        return None

    def _is_native(self, name: str) -> bool:
        linear = name.endswith("_proj.weight") or name == "lm_head.weight"
        if not (self.native and linear and self._type(name) in NATIVE_TYPES):
            return False
        from .linear import _REGISTRY, _import_formats

        _import_formats()
        return "gguf" in _REGISTRY

    def linear_format(self, module_name: str):
        name = f"{module_name}.weight"
        if name in self._tensors and self._is_native(name):
            return "gguf", {"type": self._type(name)}
        return "dense", None

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise CheckpointError(f"missing tensor {name} in {self.path.name}")
        t = self._tensors[name]
        kind = self._type(name)
        if self._is_native(name):
            data = torch.from_numpy(np.array(t.data))  # [rows, blocks * block_bytes] uint8
        else:
            if kind not in ("F32", "F16", "BF16") and kind not in self._logged:
                self._logged.add(kind)
                if kind in NATIVE_TYPES:
                    log.info("GGUF %s tensor %s is dequantized to float (%s Linear weights stay at their bit "
                             "width; embeddings are kept dense)", kind, name, kind)
                else:
                    log.info("GGUF %s tensors are dequantized to float: lowbit serves only %s Linear weights "
                             "at their bit width", kind, ", ".join(NATIVE_TYPES))
            arr = self._gguf.quants.dequantize(t.data, t.tensor_type)
            shape = [int(s) for s in reversed(t.shape)]  # GGUF lists dims innermost first
            data = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)
        order = self._row_order(name)
        return data if order is None else data[order].contiguous()

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    def tokenizer(self):
        """The tokenizer from the file's metadata, converted once and cached under ~/.cache/lowbit."""
        from transformers import AutoTokenizer

        st = self.path.stat()
        key = hashlib.sha256(f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        cache = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "tokenizers" / key
        if (cache / "tokenizer_config.json").exists():
            try:
                return AutoTokenizer.from_pretrained(str(cache))
            except Exception:  # a stale or partial cache: rebuild it below
                pass
        tok = AutoTokenizer.from_pretrained(str(self.directory), gguf_file=self.path.name)
        try:
            tok.save_pretrained(str(cache))
        except OSError as e:
            log.info("could not cache the converted tokenizer at %s: %s", cache, e)
        return tok
