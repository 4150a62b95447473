"""`python -m mixlab.ops.native`: build (or find cached) and check the native kernels ahead of time."""

from __future__ import annotations

import os
import sys

from mixlab.ops import native


def check() -> str:
    """Build (or find cached) and load the kernels: the library's path and what it vectorises. A
    RuntimeError says why not (switched off, no compiler, a failed build or load)."""
    if not native.enabled():
        raise RuntimeError(f"native kernels are switched off (MIXLAB_NATIVE={os.environ.get('MIXLAB_NATIVE')})")
    try:
        path = native.build()
        lib, simd = native.load_library(path)
    except (OSError, RuntimeError) as e:
        raise RuntimeError(f"native kernels unavailable: {e}") from e
    kinds = [name for bit, name in ((native.SIMD_AVX512, "float32/int8 (AVX-512)"),
                                    (native.SIMD_AVX512_BF16, "bf16 (AVX512-BF16)")) if simd & bit]
    return f"{path}\nABI {native.ABI_VERSION}; vectorised: {', '.join(kinds) or 'none (PyTorch kernels will be used)'}"


def main() -> int:
    try:
        print(check())
    except RuntimeError as e:
        print(f"mixlab: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
