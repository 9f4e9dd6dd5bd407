"""QTIP trellis codes: decode (every decode mode), encode, and the forward pass, in plain PyTorch.

These are the oracles for the Triton kernels and the CPU path. Format facts: ../shared/specs/qtip.md.

One internal layout serves both checkpoint layouts ("tile words"): int16 [m/td_x, n/td_y, W], one row
of W = ceil(td_x*td_y*K/16) words per tile, tiles row-major over (output, input). Each row is the
tile's bitstream of T*K bits (T = td_x*td_y weights), read MSB first across words (a word's bit 15
comes first; the int16 holds the uint16 bit pattern). State t is the L bits starting at bit t*K*V,
wrapping from the stream's end to its start (tail-biting); it decodes to V values.
- kernel layout (HYB, the published models): the checkpoint swizzles bytes for the official CUDA
  kernel; `unpack_trellis` undoes that once at load. Values sit in mma m16n8k16 fragment order:
  value c of state t lands at tile row 8*b + r8, col 8*a + 2*q4 + c where t = 16*r8 + 4*q4 + 2*a + b.
- generic layout: checkpoint rows are already tile words; state t's V values are the tile's
  row-major entries t*V ... t*V+V-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .hadamard import hadamard_reference

DECODE_MODES = ("quantlut_sym", "quantlut", "lut", "1mad", "3inst")
_TLUT_MODES = ("quantlut_sym", "quantlut", "lut")
# Folded out of the code values and back into SV by the format; kept to follow its arithmetic.
SCALE = 32.0


@dataclass(frozen=True)
class QTIPParams:
    """One layer's trellis parameters, as `quip_params` in config.json names them."""

    L: int
    K: int
    V: int
    td_x: int
    td_y: int
    tlut_bits: int
    decode_mode: str

    @property
    def kernel_layout(self) -> bool:
        """The layout of the official CUDA kernels, used by every published (HYB) checkpoint."""
        return (self.decode_mode == "quantlut_sym" and self.L == 16 and self.V == 2 and self.tlut_bits == 9
                and self.td_x == 16 and self.td_y == 16 and 2 <= self.K <= 4)

    @property
    def tile_weights(self) -> int:
        return self.td_x * self.td_y

    @property
    def states_per_tile(self) -> int:
        return self.tile_weights // self.V

    @property
    def step(self) -> int:
        """Bits shifted into the state per step (K bits for each of the V weights it yields)."""
        return self.K * self.V

    @property
    def stream_bits(self) -> int:
        return self.tile_weights * self.K

    @property
    def words_per_tile(self) -> int:
        return math.ceil(self.stream_bits / 16)

    @property
    def needs_tlut(self) -> bool:
        return self.decode_mode in _TLUT_MODES

    @property
    def tlut_shape(self) -> tuple[int, int]:
        return (1 << self.tlut_bits, self.V)

    def validate(self) -> None:
        """ValueError naming the first parameter this decoder cannot honour."""
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"unknown decode_mode {self.decode_mode!r}; known: {', '.join(DECODE_MODES)}")
        for name in ("L", "K", "V", "td_x", "td_y"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        # A state spans at most two 16-bit words at any bit offset, which the readers rely on.
        if not self.step <= self.L <= 16:
            raise ValueError(f"L must be between K*V = {self.step} and 16, got L={self.L}")
        if self.tile_weights % self.V:
            raise ValueError(f"td_x*td_y = {self.tile_weights} is not a multiple of V = {self.V}")
        if self.decode_mode in ("1mad", "3inst") and self.V != 1:
            raise ValueError(f"decode_mode {self.decode_mode!r} yields one value per state: V must be 1")
        if self.decode_mode == "lut" and self.tlut_bits != self.L:
            raise ValueError(f"decode_mode 'lut' indexes the table by the whole state: tlut_bits must equal "
                             f"L = {self.L}, got {self.tlut_bits}")
        # The hashes take index bits from below bit 16 (quantlut_sym also spends bit 15 on the sign).
        top = {"quantlut": 16, "quantlut_sym": 15}.get(self.decode_mode)
        if top is not None and not 1 <= self.tlut_bits <= top:
            raise ValueError(f"decode_mode {self.decode_mode!r} needs 1 <= tlut_bits <= {top}, "
                             f"got {self.tlut_bits}")


# ----- checkpoint layout <-> tile words ---------------------------------------------------------

def _u16(words: torch.Tensor) -> torch.Tensor:
    """int16 words -> int64 holding their unsigned value."""
    return words.to(torch.int64) & 0xFFFF


def _to_int16(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 16-bit values -> int16 with the same bit pattern (explicit: casts do not wrap portably)."""
    return (u - ((u >> 15) << 16)).to(torch.int16)


def unpack_trellis(trellis: torch.Tensor, p: QTIPParams, m: int, n: int) -> torch.Tensor:
    """Checkpoint `trellis` [(m/td_x)(n/td_y), W] -> tile words int16 [m/td_x, n/td_y, W]."""
    tm, tn = m // p.td_x, n // p.td_y
    if not p.kernel_layout:
        return trellis.reshape(tm, tn, p.words_per_tile).clone()
    # The stored bytes (little-endian words, as safetensors writes int16) in the order the official
    # kernel loads them: per pair of tile rows and pair of tile columns, 32 byte groups of 2x2 tiles
    # x K bytes, the K bytes reversed and the two bytes of every word swapped.
    u = _u16(trellis).reshape(-1)
    raw = torch.stack((u & 0xFF, u >> 8), dim=-1)
    k = p.K
    b = raw.reshape(m // 32, n // 32, 32, 2, 2, k).permute(0, 4, 1, 3, 2, 5).flip(-1)
    b = b.reshape(tm, tn, 16 * k, 2)
    return _to_int16((b[..., 0] << 8) | b[..., 1])  # first byte of the pair is the high one


def pack_trellis(words: torch.Tensor, p: QTIPParams) -> torch.Tensor:
    """Tile words int16 [m/td_x, n/td_y, W] -> the checkpoint `trellis` tensor (inverse of unpack_trellis)."""
    tm, tn, nw = words.shape
    if not p.kernel_layout:
        return words.reshape(tm * tn, nw).clone()
    u = _u16(words)
    b = torch.stack((u >> 8, u & 0xFF), dim=-1)
    b = b.reshape(tm // 2, 2, tn // 2, 2, 32, p.K).flip(-1).permute(0, 2, 4, 3, 1, 5).reshape(-1, 2)
    return _to_int16(b[:, 0] | (b[:, 1] << 8)).reshape(tm * tn, nw)


# ----- tile words <-> trellis states ------------------------------------------------------------

def _bits(u: torch.Tensor, width: int) -> torch.Tensor:
    """Unsigned values [..., c] -> their bits MSB first [..., c*width] (int64 0/1)."""
    shifts = torch.arange(width - 1, -1, -1, device=u.device)
    return ((u[..., None] >> shifts) & 1).flatten(-2)


def _from_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    shifts = torch.arange(width - 1, -1, -1, device=bits.device)
    return (bits.unflatten(-1, (-1, width)) << shifts).sum(-1)


def read_states(words: torch.Tensor, p: QTIPParams) -> torch.Tensor:
    """Tile words [..., W] -> trellis states int32 [..., T/V]: state t = stream bits [t*KV, t*KV + L)."""
    u = _u16(words)
    nbits = p.stream_bits
    if nbits % 16 == 0:
        # The stream ends on a word boundary, so the word after the last one is simply the first.
        ext = torch.cat((u, u[..., :1]), dim=-1)
    else:
        # Padding bits sit between the stream's end and its wrap-around: rebuild the words with the
        # first 16 stream bits appended right after the last stream bit.
        bits = _bits(u, 16)[..., :nbits]
        bits = torch.cat((bits, bits[..., :16]), dim=-1)
        bits = torch.nn.functional.pad(bits, (0, (-bits.shape[-1]) % 16))
        ext = _from_bits(bits, 16)
    pos = torch.arange(p.states_per_tile, device=u.device) * p.step
    word, offset = pos // 16, pos % 16
    # Words j and j+1 side by side as one 32-bit window (MSB = stream bit 16j); a state starting
    # `offset` bits into word j occupies window bits 31-offset down to 32-offset-L, always inside it.
    pair = (ext[..., word] << 16) | ext[..., word + 1]
    return ((pair >> (32 - offset - p.L)) & ((1 << p.L) - 1)).to(torch.int32)


def write_states(states: torch.Tensor, p: QTIPParams) -> torch.Tensor:
    """Trellis states [..., T/V] -> tile words int16 [..., W] (the encoder).

    State t contributes its top K*V bits at stream offset t*K*V; its remaining bits are the next
    states' top bits, so states that do not overlap that way are not a trellis walk (ValueError)."""
    s = states.to(torch.int64)
    if s.shape[-1] != p.states_per_tile:
        raise ValueError(f"expected {p.states_per_tile} states per tile, got {s.shape[-1]}")
    if ((s < 0) | (s >= 1 << p.L)).any():
        raise ValueError(f"states must lie in [0, 2^{p.L})")
    bits = _bits(s >> (p.L - p.step), p.step)
    bits = torch.nn.functional.pad(bits, (0, p.words_per_tile * 16 - p.stream_bits))
    words = _to_int16(_from_bits(bits, 16))
    if not torch.equal(read_states(words, p), s.to(torch.int32)):
        raise ValueError(f"states are not a tail-biting trellis walk: the low {p.L - p.step} bits of each "
                         f"state must be the high bits of the next (cyclically)")
    return words


# ----- states -> values -> tiles ----------------------------------------------------------------

def _fp16_from_bits(u: torch.Tensor) -> torch.Tensor:
    return _to_int16(u).view(torch.float16)


def decode_values(states: torch.Tensor, p: QTIPParams, tlut: torch.Tensor | None = None) -> torch.Tensor:
    """Trellis states [...] -> code values float32 [..., V]."""
    s = states.to(torch.int64)
    mode = p.decode_mode
    if mode in _TLUT_MODES:
        if tlut is None:
            raise ValueError(f"decode_mode {mode!r} needs tlut")
        table = tlut.float()
        if mode == "lut":
            return table[s]
        h = (s + 1) * s  # < 2^32 for 16-bit states: int64 never wraps
        mask = (1 << p.tlut_bits) - 1
        if mode == "quantlut":
            return table[(h >> (16 - p.tlut_bits)) & mask]
        vals = table[(h >> (15 - p.tlut_bits)) & mask]
        sign = 1 - 2 * ((h >> 15) & 1)
        return torch.cat((vals[..., :1] * sign[..., None], vals[..., 1:]), dim=-1)
    if mode == "1mad":
        x = (s * 34038481 + 76625530) & 0xFFFFFFFF
        total = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + (x >> 24)
        return ((total - 510).float() / 147.800537109375)[..., None]
    if mode == "3inst":
        x = (s * 89226354 + 64248484) & 0xFFFFFFFF
        r = (x & 0x8FFF8FFF) ^ 996162400
        # Two halves, each an fp16 bit pattern, added in fp16 (round the exact sum once, as fp16 hardware).
        hi, lo = _fp16_from_bits(r >> 16), _fp16_from_bits(r & 0xFFFF)
        return (hi.double() + lo.double()).half().float()[..., None]
    raise ValueError(f"unknown decode_mode {mode!r}")


def place_tiles(values: torch.Tensor, p: QTIPParams) -> torch.Tensor:
    """Values [tm, tn, T/V, V] (state-major) -> the code matrix [tm*td_x, tn*td_y]."""
    tm, tn = values.shape[:2]
    if p.kernel_layout:
        # [r8, q4, a, b, c] -> rows (b, r8), cols (a, q4, c): the m16n8k16 A-fragment order.
        v = values.reshape(tm, tn, 8, 4, 2, 2, 2).permute(0, 5, 2, 1, 4, 3, 6)
    else:
        v = values.reshape(tm, tn, p.td_x, p.td_y).permute(0, 2, 1, 3)
    return v.reshape(tm * p.td_x, tn * p.td_y)


def qtip_decode_reference(words: torch.Tensor, p: QTIPParams, tlut: torch.Tensor | None = None) -> torch.Tensor:
    """Tile words int16 [tm, tn, W] -> the decoded code matrix W_hat float32 [tm*td_x, tn*td_y]."""
    return place_tiles(decode_values(read_states(words, p), p, tlut), p)


# ----- whole layers -----------------------------------------------------------------------------

def trellis_states_reference(trellis: torch.Tensor, p: QTIPParams, m: int, n: int) -> torch.Tensor:
    """Checkpoint `trellis` -> trellis states int32 [m/td_x, n/td_y, T/V]."""
    return read_states(unpack_trellis(trellis, p, m, n), p)


def pack_trellis_reference(states: torch.Tensor, p: QTIPParams) -> torch.Tensor:
    """Trellis states [m/td_x, n/td_y, T/V] -> the checkpoint `trellis` tensor in the published layout."""
    return pack_trellis(write_states(states, p), p)


def random_trellis(p: QTIPParams, m: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random valid checkpoint `trellis`: any bitstream is a tail-biting walk, so random words are;
    only padding bits past the stream (generic layouts whose T*K is not a multiple of 16) stay zero."""
    tm, tn = m // p.td_x, n // p.td_y
    u = torch.randint(0, 1 << 16, (tm, tn, p.words_per_tile), generator=generator, dtype=torch.int64)
    pad = p.words_per_tile * 16 - p.stream_bits
    u[..., -1] &= 0xFFFF ^ ((1 << pad) - 1)
    return pack_trellis(_to_int16(u), p)


def _chunks(rcp: int, tp_rank: int, side: int) -> int:
    """Independent Hadamard blocks on one side: rcp 1 splits the input (side 1), rcp 2 the output (side 2)."""
    return tp_rank if rcp == side else 1


def qtip_dequantize_reference(hatw: torch.Tensor, SU: torch.Tensor, SV: torch.Tensor, rcp: int = 0,
                              tp_rank: int = 8) -> torch.Tensor:
    """Effective weight float32 [m, n] = diag(SV) H_m W_hat H_n^T diag(SU) (block-diagonal H when split)."""
    w = hadamard_reference(hatw.float(), chunks=_chunks(rcp, tp_rank, 1))  # rows: W_hat H_n^T
    w = hadamard_reference(w.T, chunks=_chunks(rcp, tp_rank, 2)).T  # columns: H_m (.)
    return SV.float()[:, None] * w * SU.float()[None, :]


def qtip_forward_reference(x: torch.Tensor, hatw: torch.Tensor, SU: torch.Tensor, SV: torch.Tensor,
                           rcp: int = 0, tp_rank: int = 8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) computed as the format does, in float32, returned in x's dtype:
    x*SU -> H_n^T(.)/32 -> (.) @ W_hat^T -> H_m(.) -> (.)*SV*32."""
    m, n = hatw.shape
    h = x.reshape(-1, n).float() * SU.float()
    h = hadamard_reference(h, transpose=True, chunks=_chunks(rcp, tp_rank, 1)) / SCALE
    y = h @ hatw.float().T
    y = hadamard_reference(y, chunks=_chunks(rcp, tp_rank, 2)) * (SV.float() * SCALE)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], m)
