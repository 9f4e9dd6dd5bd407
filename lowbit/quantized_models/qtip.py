"""QTIP checkpoints (Cornell-RelaxML): config.json `quip_params`, per-layer trellis codes.

A layer stores `trellis` (int16 codes), `SU` [in], `SV` [out], `tlut` (lookup-table modes),
`rcp`/`tp_rank` (tensor-parallel Hadamard split) and maybe `bias`; ../shared/specs/qtip.md has the
format. The effective weight is W = diag(SV) H_m W_hat H_n^T diag(SU), W_hat the decoded codes.

Buffers kept by QTIPLinear (what a kernel reads; nothing dense):
- `codes`  int16 [out/td_x, in/td_y, ceil(td_x*td_y*K/16)]: tile words, tiles row-major over
  (output, input). A tile's words are its bitstream MSB first (bit 15 of word 0 is stream bit 0; the
  int16 holds the uint16 pattern). For HYB (16x16 tiles, 16K words) the state of weight-pair t
  (0..127) of tile (i, j) is, with p = 2K*t, w = codes[i, j] as uint16 and w[16K] = w[0]:
      state = ((w[p // 16] << 16 | w[p // 16 + 1]) >> (16 - p % 16)) & 0xFFFF
  and its two values go to tile row 8*(t & 1) + (t >> 4), columns 8*((t >> 1) & 1) + 2*((t >> 2) & 3)
  + c for c = 0, 1 (mma fragment order; see lowbit/kernels/qtip.py). Generic layouts: state t is
  the L bits at stream offset t*K*V (wrapping) and its V values are tile entries t*V.., row-major.
  The checkpoint's byte swizzle of the HYB layout is undone once, at load.
- `SU` [in] (checkpoint float dtype, fp16 in published models), `SV` float32 [out],
  `tlut` float16 [2^tlut_bits, V] for quantlut_sym/quantlut/lut, `bias` [out] when present.
- `rcp`, `tp_rank` are plain ints (0: one Hadamard per side; 1: input split into tp_rank blocks;
  2: output split).
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..kernels.hadamard import hadamard_factor
from ..kernels.qtip import (
    QTIPParams,
    qtip_decode_reference,
    qtip_dequantize_reference,
    qtip_forward_reference,
    unpack_trellis,
)
from .linear import CheckpointError, LayerTensors, PendingOutput, QuantLinear, register

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_PARAM_KEYS = ("L", "K", "V", "td_x", "td_y", "tlut_bits", "decode_mode")
# model.layers.N.{self_attn,mlp}.X_proj; published models keep all seven separate, fused modules
# (qkv_proj, gate_up_proj) are accepted for checkpoints re-exported that way.
_MODULE = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down|qkv|gate_up)_proj")
_FUSED_PARTS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
# Weights decoded per block when building W_hat: bounds the int64 temporaries of the reference.
_DECODE_BLOCK = 1 << 20


def _params(config: Mapping[str, Any] | None, where: str) -> QTIPParams:
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: a QTIP layer needs its quip_params block, got {config!r}")
    missing = [k for k in _PARAM_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{where}: QTIP config (quip_params) lacks {', '.join(map(repr, missing))}")
    try:
        ints = {k: int(config[k]) for k in _PARAM_KEYS if k != "decode_mode"}
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: QTIP config values {_PARAM_KEYS[:-1]} must be integers") from None
    p = QTIPParams(decode_mode=str(config["decode_mode"]), **ints)
    try:
        p.validate()
    except ValueError as e:
        raise CheckpointError(f"{where}: unsupported QTIP config: {e}") from None
    return p


@functools.cache
def _triton_module():
    """The Triton kernels module once it exists; None until then (or without triton)."""
    try:
        return importlib.import_module("lowbit.kernels.qtip_triton")
    except ModuleNotFoundError as e:
        if e.name in ("lowbit.kernels.qtip_triton", "triton"):
            return None
        raise


@register("qtip")
class QTIPLinear(QuantLinear):
    def __init__(self, params: QTIPParams, in_features: int, out_features: int, codes: torch.Tensor,
                 SU: torch.Tensor, SV: torch.Tensor, tlut: torch.Tensor | None, rcp: int = 0,
                 tp_rank: int = 8, bias: torch.Tensor | None = None):
        super().__init__(in_features, out_features)
        self.params = params
        self.rcp = int(rcp)
        self.tp_rank = int(tp_rank)
        self.register_buffer("codes", codes)
        self.register_buffer("SU", SU)
        self.register_buffer("SV", SV)
        self.register_buffer("tlut", tlut)
        self.register_buffer("bias", bias)
        # SU of ±1 only (published checkpoints): lets the Hadamard kernels take fp16 products exactly.
        # Read here, at load, because a decode step may run inside a CUDA graph capture.
        self.su_signs = bool((SU.abs() == 1).all())
        # W_hat decoded once per device by the reference path: a plain attribute, not a buffer, so it
        # never counts as storage and never reaches a state dict.
        self._hatw: torch.Tensor | None = None

    # ----- config.json ---------------------------------------------------------------------------

    @classmethod
    def matches(cls, hf_config: Mapping[str, Any]) -> bool:
        return hf_config.get("quip_params") is not None

    @classmethod
    def layer_config(cls, hf_config: Mapping[str, Any], module_name: str) -> Mapping[str, Any] | None:
        qp = hf_config.get("quip_params")
        if not isinstance(qp, Mapping):
            raise CheckpointError(f"config.json quip_params must be an object, got {type(qp).__name__}")
        match = _MODULE.fullmatch(module_name)
        if match is None:  # embeddings, lm_head: dense in every QTIP model
            return None
        layer, short = match.groups()
        parts = _FUSED_PARTS.get(short, (short,))
        skip = set(qp.get("skip_list") or ())
        skipped = [f"{layer}_{part}" in skip for part in parts]
        if all(skipped):
            return None
        if any(skipped):
            raise CheckpointError(
                f"config.json quip_params.skip_list keeps only some of {', '.join(f'{layer}_{p}' for p in parts)} "
                f"dense, but {module_name} stores them as one fused module")
        block = {k: qp[k] for k in _PARAM_KEYS if k in qp}
        k_v = qp.get("K_v_proj")
        if k_v is not None and "v" in parts and "K" in qp and int(k_v) != int(qp["K"]):
            if len(parts) > 1:
                raise CheckpointError(
                    f"config.json quip_params.K_v_proj = {k_v} differs from K = {qp['K']}, but {module_name} "
                    f"fuses v_proj with q/k_proj into one layer of a single K")
            block["K"] = k_v
        return block

    # ----- loading -------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, config, tensors: LayerTensors, in_features: int, out_features: int):
        n, m = int(in_features), int(out_features)
        where = tensors.prefix or "QTIP layer"
        p = _params(config, where)
        if m % p.td_x or n % p.td_y:
            raise CheckpointError(
                f"{where}: a {m}x{n} (out x in) layer is not a whole number of {p.td_x}x{p.td_y} trellis tiles")
        if p.kernel_layout and (m % 32 or n % 32):
            raise CheckpointError(
                f"{where}: the HYB kernel layout interleaves 2x2 blocks of 16x16 tiles, so out and in "
                f"features must be multiples of 32, got {m}x{n}")

        trellis = tensors.take("trellis", dtype=torch.int16)
        want = (m // p.td_x * (n // p.td_y), p.words_per_tile)
        if tuple(trellis.shape) != want:
            raise CheckpointError(
                f"tensor {tensors.where('trellis')} has shape {list(trellis.shape)}, expected "
                f"[(out/td_x)*(in/td_y), ceil(td_x*td_y*K/16)] = {list(want)} for out={m}, in={n}, "
                f"K={p.K}, td={p.td_x}x{p.td_y}")
        SU = tensors.take("SU", (n,), _FLOAT)
        SV = tensors.take("SV", (m,), torch.float32)
        tlut = None
        if p.needs_tlut:
            if "tlut" not in tensors:
                raise CheckpointError(
                    f"missing tensor {tensors.where('tlut')}: decode_mode {p.decode_mode!r} needs its "
                    f"float16 lookup table of shape {list(p.tlut_shape)}")
            tlut = tensors.take("tlut", p.tlut_shape, torch.float16)
        rcp_t = tensors.take("rcp", (), torch.int64, optional=True)
        tp_t = tensors.take("tp_rank", (), torch.int64, optional=True)
        # Defaults of the official module when a checkpoint predates these buffers.
        rcp = 0 if rcp_t is None else int(rcp_t)
        tp_rank = 8 if tp_t is None else int(tp_t)
        if rcp not in (0, 1, 2):
            raise CheckpointError(f"tensor {tensors.where('rcp')} is {rcp}, expected 0, 1 or 2")
        split = {1: ("in", n), 2: ("out", m)}.get(rcp)
        if split and (tp_rank < 1 or split[1] % tp_rank):
            raise CheckpointError(
                f"tensor {tensors.where('tp_rank')} is {tp_rank}: rcp={rcp} splits {split[0]}_features = "
                f"{split[1]} into tp_rank equal blocks")
        for side, size, chunks in (("in", n, tp_rank if rcp == 1 else 1), ("out", m, tp_rank if rcp == 2 else 1)):
            try:
                hadamard_factor(size // chunks)
            except ValueError as e:
                raise CheckpointError(f"{where}: {side}_features {size} has no QTIP Hadamard transform: {e}") from None
        bias = tensors.take("bias", (m,), _FLOAT, optional=True)
        codes = unpack_trellis(trellis, p, m, n)
        return cls(p, n, m, codes, SU, SV, tlut, rcp, tp_rank, bias)

    # ----- compute -------------------------------------------------------------------------------

    def decoded_codes(self) -> torch.Tensor:
        """W_hat, the decoded code matrix float32 [out, in], decoded a block of tile rows at a time."""
        p = self.params
        rows = max(1, _DECODE_BLOCK // (p.td_x * self.in_features))
        blocks = [qtip_decode_reference(self.codes[i:i + rows], p, self.tlut)
                  for i in range(0, self.codes.shape[0], rows)]
        return torch.cat(blocks)

    def _cached_hatw(self, device: torch.device) -> torch.Tensor:
        if self._hatw is None or self._hatw.device != device:
            with torch.no_grad():
                self._hatw = self.decoded_codes().to(device)
        return self._hatw

    def _apply(self, fn, recurse=True):
        self._hatw = None  # buffers move or change dtype: decode again from them
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        return qtip_dequantize_reference(self._cached_hatw(self.codes.device), self.SU, self.SV,
                                         self.rcp, self.tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            kernels = _triton_module()
            if kernels is not None:
                # Hook for the fused decode kernels: they read the buffers documented above.
                return kernels.qtip_forward(self, x)
        return qtip_forward_reference(x, self._cached_hatw(x.device), self.SU, self.SV, self.rcp,
                                      self.tp_rank, self.bias)

    def _fusing_kernels(self, x: torch.Tensor):
        """The Triton module when x [B, n] can run the fused input transforms, else None."""
        if not x.is_cuda or x.dim() != 2 or x.stride(-1) != 1:
            return None
        return _triton_module()

    def forward_pending(self, x):
        kernels = self._fusing_kernels(x)
        if kernels is not None:
            return kernels.qtip_forward_pending(self, x)
        return self(x)

    def forward_normed(self, x, norm_weight, eps, residual=None, rotary=None, activate=0):
        kernels = self._fusing_kernels(x.raw if isinstance(x, PendingOutput) else x)
        if kernels is not None and (residual is None or residual.stride(-1) == 1):
            return kernels.qtip_forward_normed(self, x, norm_weight, eps, residual, rotary, activate)
        return super().forward_normed(x, norm_weight, eps, residual, rotary, activate)

    def forward_gated(self, gate, up, pending=False, activated=False):
        kernels = self._fusing_kernels(gate)
        if kernels is not None and up.shape == gate.shape and up.stride(-1) == 1 and \
                kernels.takes_gate(gate.shape[-1], gate.shape[0]):
            return kernels.qtip_forward_gated(self, gate, up, pending, activated)
        return super().forward_gated(gate, up, pending, activated)

    def activates_in_launch(self, like):
        """The output transform takes the SiLU (`act_n`); LOWBIT_SILU_IN_OUTPUT=0 leaves it to the
        down projection's input launch (A/B: `benchmarks.replay_profile --knob LOWBIT_SILU_IN_OUTPUT`)."""
        return os.environ.get("LOWBIT_SILU_IN_OUTPUT", "1") != "0" and self._fusing_kernels(like) is not None

    def takes_activated(self, like):
        """The input transform takes SiLU·mul (`takes_gate`): each of its programs computes the
        SiLU over the whole row (22 programs at 11008 and one row), which `activated` leaves out."""
        kernels = self._fusing_kernels(like)
        return kernels is not None and kernels.takes_gate(self.in_features, like.shape[0])

    def describe(self) -> dict[str, Any]:
        p = self.params
        return {"L": p.L, "K": p.K, "V": p.V, "td": f"{p.td_x}x{p.td_y}", "decode_mode": p.decode_mode,
                "tlut_bits": p.tlut_bits, "rcp": self.rcp, "tp_rank": self.tp_rank,
                "layout": "kernel" if p.kernel_layout else "generic"}
