"""(run as a script, without TRITON_INTERPRET) Compile each kernel launched with PDL for sm_90 and check its PTX:
one ``griddepcontrol.wait``, and no global load, store, async copy or atomic before it (only the L2 prefetch).
Needs no GPU: Triton's NVIDIA backend compiles to PTX on any machine. Prints one line a variant, then OK or FAIL."""
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "the GPU versions of kernels.pdl's helpers are what is checked"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import fused_ops, pdl, small_linear, triton_attention as ta  # noqa: E402

ACCESS = re.compile(r"\b(ld\.global|st\.global|cp\.async|atom\.global|red\.global|cp\.reduce)")
FLOATS = {"qk_scale", "eps", "head_eps"}


def signature(fn, ptrs: dict, consts: dict) -> dict:
    """Pointers as ``ptrs`` names them (default bf16), the floats fp32, other arguments i32."""
    return {n: "constexpr" if n in consts else ("*" + ptrs.get(n, "bf16") if n.endswith("_ptr")
                                                else "fp32" if n in FLOATS else "i32") for n in fn.arg_names}


def check(name: str, fn, ptrs: dict, consts: dict, **options) -> bool:
    ptx = triton.compile(ASTSource(fn, signature(fn, ptrs, consts), constexprs=consts),
                         target=GPUTarget("cuda", 90, 32), options=dict(launch_pdl=True, **options)).asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    waits = body.count("griddepcontrol.wait")
    before = [ln.strip() for ln in body[:body.find("griddepcontrol.wait")].splitlines() if ACCESS.search(ln)]
    ok = waits == 1 and not before
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {waits} wait(s), {len(before)} global access(es) before it"
          + "".join(f"\n       {ln}" for ln in before[:4]))
    return ok


ok = True
for trigger in (pdl.TRIGGER_EARLY, pdl.TRIGGER_WAIT, pdl.TRIGGER_END):
    for gated, norm, sq_in, residual, rope, lines in (
            (True, True, True, False, False, 0), (True, True, True, False, False, 4),
            (False, True, False, False, False, 0), (False, False, False, True, False, 0),
            (False, True, True, False, "norm-heads", 0), (False, True, False, False, "plain", 4)):
        consts = dict(NORM=norm, SQ_IN=sq_in, SQ_OUT=residual, GATED=gated, HAS_BIAS=True, RESIDUAL=residual,
                      EVEN_K=True, ROPE=bool(rope), NORM_HEADS=rope == "norm-heads",
                      STORE_KV=bool(rope), HALF=64 if rope else 1,
                      BLOCK_M=16, BLOCK_N=64 if rope else 32, BLOCK_K=256, NUM_STAGES=4, DOT_F32=False, NORM_M=1,
                      NORM_K=4096, PDL=True, TRIGGER=trigger, PREFETCH_LINES=lines, LINE_ELEMS=64)
        ok &= check(f"small_linear trigger={trigger} gated={gated} norm={norm} residual={residual} rope={rope} "
                    f"prefetch={lines}", small_linear._small_linear_kernel,
                    dict(sq_in_ptr="fp32", sq_out_ptr="fp32", cos_ptr="fp32", sin_ptr="fp32", pos_ptr="i64",
                         slot_ptr="i64"), consts, num_warps=4, num_stages=4)
    for mode in (0, 1):  # PAGED, LINEAR decode; split-KV and not
        for split in (False, True):
            consts = dict(MODE=mode, BLOCK_SIZE=16, GROUP=4, GROUP_P=4, BLOCK_Q=1, BLOCK_M=16, BLOCK_N=32,
                          HEAD_DIM=128, BLOCK_D=128, SPLIT=split, EVEN_SPLIT=False, DIRECT=True, BT_AHEAD=True,
                          DOT_F32=False, SCALED=False, WINDOWED=False, RING=False, CAUSAL_SPLIT=False,
                          LONGEST_FIRST=False, SEQ_MAJOR=False, PDL=True, TRIGGER=trigger)
            ptrs = dict(po_ptr="fp32", plse_ptr="fp32", qsl_ptr="i32", seq_lens_ptr="i32", bt_ptr="i32",
                        base_ptr="i64", ks_ptr="fp32", vs_ptr="fp32")
            ok &= check(f"attention trigger={trigger} mode={mode} split={split}", ta._attn_kernel, ptrs, consts,
                        num_warps=4, num_stages=3)
    ok &= check(f"merge trigger={trigger}", ta._merge_kernel, dict(po_ptr="fp32", plse_ptr="fp32"),
                dict(SPLITS_P=4, HEAD_DIM=128, BLOCK_D=128, PDL=True, TRIGGER=trigger), num_warps=2)
    for norm in (False, True):
        ok &= check(f"qk_norm_rope trigger={trigger} norm={norm}", fused_ops._qk_norm_rope_kernel,
                    dict(cos_ptr="fp32", sin_ptr="fp32", pos_ptr="i64", slot_ptr="i64"),
                    dict(HALF=64, HQP=32, HKP=8, NORM=norm, STORE=True, PDL=True, TRIGGER=trigger), num_warps=4)
print("OK" if ok else "FAIL")
sys.exit(0 if ok else 1)
