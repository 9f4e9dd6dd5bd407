"""Registers and machine code of a kernel launch, compiled for the H100 (sm_90) on a machine without a GPU.

    python -m benchmarks.sass uniform-gemv --shape 4096x4096 --config 16,32,4
    python -m benchmarks.sass qtip-frag --shape 22016x4096 --batch 1 --config 4,4,16,2
    python -m benchmarks.sass qtip-frag --shape 4096x4096 --batch 1 --config 2,8,128,4,16 --sass /tmp/frag.sass
    python -m benchmarks.sass vptq-gemv --shape 4096x4096 --config 8,64,16,4,2
    python -m benchmarks.sass hadamard --shape 12288x1 --batch 1 --config 1     # the q|k|v output transform with rotary
    python -m benchmarks.sass attention --shape 4096x128 --config 1 --pdl      # decode attention, first tile early

Device time is scarce; what a kernel compiles to is not. The launch is made through lowbit's own entry
point on CPU tensors, with Triton's launcher replaced by a recorder (so the arguments, constexprs and
grid are exactly what a real launch would pass); each recorded launch is then compiled with
`triton.compile` for `GPUTarget("cuda", 90, 32)`, integer arguments specialized as the JIT would
(== 1, divisible by 16), and `cuobjdump` (bundled with Triton) reports registers, spills and shared
memory, and the instruction classes inside the kernel's main loop (its longest backward branch).
On CPU tensors `pdl.enabled` is false, so launches compile without programmatic dependent launch
unless `--pdl` asks for it; then the report also counts the global loads placed before the wait
(`griddepcontrol.wait`, ACQBULK in SASS): what a program fetches while the kernel before it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from collections import Counter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import jit

from lowbit.kernels.tuning import interpreting

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
           torch.int16: "i16", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8"}


@contextlib.contextmanager
def recording():
    """Within the block, `kernel[grid](...)` records (kernel, grid, args, kwargs) instead of launching."""
    launches = []
    old = jit.KernelInterface.__getitem__

    def record(self, grid):
        return lambda *args, **kwargs: launches.append((self, grid, args, kwargs))

    jit.KernelInterface.__getitem__ = record
    try:
        yield launches
    finally:
        jit.KernelInterface.__getitem__ = old


def _signature(fn, args, kwargs):
    """ASTSource's signature, constants and attributes for one recorded call."""
    binding = dict(zip([p.name for p in fn.params], args, strict=False))  # the rest come as keywords
    binding.update(kwargs)
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = binding[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _DTYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        elif v == 1 and not p.do_not_specialize:
            sig[p.name] = "constexpr"
            consts[(i,)] = 1
        else:
            sig[p.name] = "i64" if abs(v) >= 2**31 else "i32"
            if v % 16 == 0 and not p.do_not_specialize and not p.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_launch(kernel, args, kwargs, capability: int = 90) -> dict:
    """Compile one recorded launch; return registers, spills, shared bytes, the SASS text."""
    kw = dict(kwargs)
    options = {k: kw.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kw}
    kw.pop("launch_pdl", None)
    src = ASTSource(kernel, *_signature(kernel, args, kw))
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return dict(name=kernel.__name__, registers=int(found.get("REG", 0)), local=int(found.get("LOCAL", 0)),
                shared=int(found.get("SHARED", 0)), dynamic=int(getattr(compiled.metadata, "shared", 0)), sass=sass)


def _instructions(sass: str) -> list[tuple[str, str, str, str]]:
    """(address, predicate, opcode, operands) of each SASS instruction, in code order."""
    return re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)


def main_loop_span(sass: str, pick: str = "longest") -> tuple[int, int] | None:
    """(target, source) addresses of the longest backward branch (pick "first": the first one in
    the code), None where the kernel has no loop (a walk the compiler unrolled whole)."""
    best = None
    for addr, _, op, rest in _instructions(sass):
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < int(addr, 16):
            span = (int(target.group(1), 16), int(addr, 16))
            if best is None or (span[0] < best[0] if pick == "first" else span[1] - span[0] > best[1] - best[0]):
                best = span
    return best


def main_loop_counts(sass: str, pick: str = "longest") -> Counter:
    """Instruction classes between the target and the source of the longest backward branch (the
    kernel's main loop), with pick "first" of the first one in the code (where a split-K epilogue's
    loop is longer than the main loop), with "whole" (or where there is no loop) of the whole
    kernel: the opcode up to its first dot, memory instructions whole (LDG.E.128 and LDG.E.U16
    apart). Static counts: code on a path not taken (a slow path) counts too."""
    rows = _instructions(sass)
    best = main_loop_span(sass, pick)
    lo, hi = best if best is not None and pick != "whole" else (0, 1 << 62)
    return Counter(op.split(".")[0] if not op.startswith(("LDG", "STG", "LDS", "STS")) else op
                   for addr, _, op, _ in rows if lo <= int(addr, 16) <= hi)


def _int4_layer(m: int, n: int, g: torch.Generator):
    """A random int4 g128 layer (zero 8), packed."""
    from lowbit.kernels import uniform_triton as ut

    q = torch.randint(0, 16, (m, n), generator=g)
    return ut.pack_uniform(q, 4, torch.rand(n // 128, m, generator=g).half(), torch.full((n // 128, m), 8.0).half(), 128)


def _uniform_gemv(m: int, n: int, batch: int, config: list[int]) -> None:
    """int4 g128 decode-GEMV (`_uq_gemv_kernel`): config BK, BMW (output words), warps[, split[,
    register cap]]."""
    from lowbit.kernels import uniform_triton as ut

    bk, bmw, warps, *rest = config
    g = torch.Generator().manual_seed(0)
    p = _int4_layer(m, n, g)
    cfg = ut.UQConfig("gemv", bk=bk, bmw=bmw, bb=1, split_k=rest[0] if rest else 8, num_warps=warps,
                      max_registers=rest[1] if len(rest) > 1 else 0)
    ut.run_config(torch.randn(batch, n, generator=g).half(), p, None, cfg)


def _uniform_frag(m: int, n: int, batch: int, config: list[int]) -> None:
    """int4 g128 tensor-core decode (`uniform_frag_triton._uq_frag_kernel`): config row tiles, warps,
    prefetch."""
    from lowbit.kernels import uniform_frag_triton as uf

    rt, warps, pf = config
    g = torch.Generator().manual_seed(0)
    p = _int4_layer(m, n, g)
    out = torch.empty(batch, m, dtype=torch.float16)
    uf.uq_frag_matmul(torch.randn(batch, n, generator=g).half(), uf.repack_frag(p), out, rt, warps, pf)


def _qtip_frag(m: int, n: int, batch: int, config: list[int]) -> None:
    """QTIP 2-bit fragment kernel (`_hyb_frag_kernel`): config row tiles, warps, tiles a split, prefetch[,
    table copies (32)[, 0: the masked loop in place of the peeled one]]."""
    from lowbit.kernels import qtip_frag_triton as qf

    rt, warps, per, pf, *more = config
    copies, peel = (more + [32, 1][len(more):])[:2]
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-(2**15), 2**15, (m // 16, n // 16, 32), generator=g, dtype=torch.int32).to(torch.int16)
    lut = torch.randint(-(2**31), 2**31 - 1, (512,), generator=g, dtype=torch.int64).to(torch.int32)
    qf.frag_matmul(codes, lut, 2, torch.randn(batch, n, generator=g).half(), torch.zeros(batch, m), rt, warps,
                   per, atomic=per < n // 16, prefetch=pf, copies=copies, peel=bool(peel))


def _vptq_gemv(m: int, n: int, batch: int, config: list[int]) -> None:
    """VPTQ v8-k65536 lookup-GEMV (`vptq_triton._vq_gemv_kernel`): config BR (vectors), BC (columns),
    split[, warps[, Triton stages]]."""
    from benchmarks.kernels_uv import vptq_layer
    from lowbit.kernels import vptq_triton as vq

    br, bc, split, *rest = config
    p = vptq_layer(m, n, device="cpu")
    cfg = vq.VQConfig("gemv", br=br, bc=bc, split_k=split, num_warps=rest[0] if rest else 4,
                      num_stages=rest[1] if len(rest) > 1 else 1)
    vq.run_config(torch.randn(batch, n).half(), p, None, cfg)


def _hadamard(m: int, n: int, batch: int, config: list[int]) -> None:
    """A QTIP transform of length m (n unused) as a decode step launches it for `batch` rows; config:
    0 an output transform (float32 product in, SV, fp16 out), 1 the same with the rotary step and KV
    write of a fused q|k|v output (heads of 128, 32 q heads), 2 an input transform taking SiLU·mul
    (fp16 gate and up, SU's signs, zeroing the split-K output as the decode launch asks), 3 an input
    transform taking the residual add and RMSNorm, 4 kind 2 with the gate already SiLU'd
    (`up_activated`), 5 kind 0 with SiLU on the first half (`act_n`: a gate|up output)."""
    from lowbit.kernels import fused
    from lowbit.kernels import hadamard_triton as ht

    g = torch.Generator().manual_seed(0)
    kind = config[0]
    signs = (torch.randint(0, 2, (m,), generator=g) * 2 - 1).half()
    if kind in (2, 3, 4):
        x = torch.randn(batch, m, generator=g).half()
        extra = (dict(up=torch.randn(batch, m, generator=g).half(), zero=torch.empty(batch, 4096),
                      up_activated=kind == 4)
                 if kind != 3 else dict(norm=(torch.rand(m, generator=g).half(), 1e-5, x.clone(), torch.empty_like(x))))
        ht.hadamard_transform(x, transpose=True, pre=signs, pre_signs=True, alpha=1 / 32, **extra)
        return
    rotary = None
    if kind == 1:
        hkv = (m // 128 - 32) // 2
        cache = torch.zeros(64, hkv, 128, dtype=torch.float16)
        rotary = fused.QKVRotary(torch.arange(batch), torch.rand(64, generator=g), 32, hkv, 128,
                                 (cache, cache.clone(), torch.arange(batch)))
    ht.hadamard_transform(torch.randn(batch, m, generator=g), post=signs, alpha=32.0, out_dtype=torch.float16,
                          rotary=rotary, act_n=m // 2 if kind == 5 else 0)


def _attention(m: int, n: int, batch: int, config: list[int]) -> None:
    """Paged decode attention for `batch` sequences, Llama-2-7B heads (32 of 128), a page table of m
    tokens a sequence (its capacity: the split count follows it) at context n; config: early (1: the
    first tile read before the PDL wait, what PDL launches take; 0: after it)."""
    from lowbit.kernels.attention import paged_decode_attention

    page, heads = 16, 32
    blocks = -(-m // page)
    q = torch.zeros(batch, heads, 128, dtype=torch.float16)
    cache = torch.zeros(batch * blocks + 1, page, heads, 128, dtype=torch.float16)
    tables = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
    lens = torch.full((batch,), n, dtype=torch.int32)
    paged_decode_attention(q, cache, cache.clone(), tables, lens, 128 ** -0.5, early=bool(config[0]))


def loads_before_wait(sass: str) -> int | None:
    """Global loads (LDG, LDGSTS) placed before the first ACQBULK (griddepcontrol.wait); None without one."""
    ops = [op for _, _, op, _ in _instructions(sass)]
    if "ACQBULK" not in ops:
        return None
    return sum(op.startswith("LDG") for op in ops[:ops.index("ACQBULK")])


SCENARIOS = {"uniform-gemv": _uniform_gemv, "uniform-frag": _uniform_frag, "qtip-frag": _qtip_frag,
             "vptq-gemv": _vptq_gemv, "hadamard": _hadamard, "attention": _attention}
# which loop to count: VPTQ's split-K epilogue (16 partial loads) is a longer loop than its main one;
# the Hadamard kernels are unrolled (a loop there is sin / cos's slow path)
LOOP_PICK = {"vptq-gemv": "first", "hadamard": "whole", "attention": "whole"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--shape", default="4096x4096", help="OUTxIN")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--config", required=True, help="comma-separated launch shape (see the scenario)")
    ap.add_argument("--sass", help="also write the SASS here")
    ap.add_argument("--pdl", action="store_true", help="compile the launches as PDL launches (PDL=True)")
    args = ap.parse_args(argv)
    if interpreting():
        ap.error("TRITON_INTERPRET is set: kernels are interpreted, there is nothing to compile")
    m, n = (int(v) for v in args.shape.split("x"))
    with recording() as launches:
        SCENARIOS[args.scenario](m, n, args.batch, [int(v) for v in args.config.split(",")])
    for kernel, grid, a, kw in launches:
        if args.pdl and "PDL" in kw:
            kw = {**kw, "PDL": True}
        out = compile_launch(kernel, a, kw)
        early = loads_before_wait(out["sass"]) if args.pdl else None
        print(f"{out['name']} grid {tuple(grid)}: {out['registers']} registers, {out['local']} B local (spills), "
              f"{out['shared']} B static shared, {out['dynamic']} B dynamic" + ("" if early is None else f", {early} global loads before the wait"))
        pick = LOOP_PICK.get(args.scenario, "longest")
        loop = main_loop_counts(out["sass"], pick)
        ranked = loop.most_common()
        shown = ranked[:16] + [(k, v) for k, v in ranked[16:] if k.startswith(("LD", "ST"))]  # every load / store
        where = ("whole kernel" if pick == "whole" else "main loop" if main_loop_span(out["sass"], pick)
                 else "whole kernel (no loop)")
        print(f"  {where}: "
              + ", ".join(f"{k} {v}" for k, v in shown)
              + f" ({sum(loop.values())} instructions)")
        if args.sass:
            with open(args.sass, "w") as f:
                f.write(out["sass"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
