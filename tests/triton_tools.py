"""What the Triton kernel tests share: running kernels under the interpreter on a CPU, and compiling them for
sm_90 ahead of time (triton ships ptxas) to check resources without a GPU."""

from __future__ import annotations

import os

import pytest

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_INTERP_REASON = None
if not INTERPRET:
    _INTERP_REASON = "set TRITON_INTERPRET=1 to run the Triton kernels on CPU"
else:
    try:
        import numpy
        import triton

        def _v(mod):
            return tuple(int(p) for p in mod.__version__.split(".")[:2])

        if _v(numpy) >= (2, 4) and _v(triton) <= (3, 6):
            _INTERP_REASON = f"triton {triton.__version__}'s interpreter breaks on numpy {numpy.__version__} >= 2.4"
    except ImportError as exc:
        _INTERP_REASON = f"triton interpreter unavailable: {exc}"


def interpret(test):
    """Run under TRITON_INTERPRET=1 only; numpy 2.x's scalar-conversion warnings from the interpreter are noise."""
    test = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")(test)
    return pytest.mark.skipif(_INTERP_REASON is not None, reason=_INTERP_REASON or "")(test)



def compile_sm90(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int):
    """Compile a @triton.jit kernel for sm_90 ahead of time (no GPU needed: triton ships ptxas). args maps
    each runtime argument to a type string ("*bf16", "fp32") or an example int, as the JIT would see it (ints
    below 2**31 only)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature, attrs = {}, {}
    constexprs = dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        v = constexprs.get(name, args.get(name))
        if name in constexprs or v == 1:  # the JIT turns an int equal to 1 (a unit stride) into a constant
            signature[name] = "constexpr"
            constexprs[name] = v
            continue
        signature[name] = v if isinstance(v, str) else "i32"
        if (isinstance(v, str) and v.startswith("*")) or (isinstance(v, int) and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT infers for aligned pointers and ints
    src = ASTSource(fn, signature, constexprs, attrs)
    return compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": num_warps, "num_stages": num_stages})


def spilled_bytes(kernel, tmp_path) -> int:
    """Bytes of register spill stores ptxas reports for a compiled kernel's PTX (triton ships ptxas)."""
    import re
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
