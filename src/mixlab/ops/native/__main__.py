"""`python -m mixlab.ops.native`: build (or find cached) and check the native kernels ahead of time."""

from __future__ import annotations

import sys

from mixlab.ops import native


def main() -> int:
    if not native.enabled():
        print("mixlab: native kernels are switched off (MIXLAB_NATIVE=0)", file=sys.stderr)
        return 1
    try:
        path = native.build()
        lib, simd = native.load_library(path)
    except (OSError, RuntimeError) as e:
        print(f"mixlab: native kernels unavailable: {e}", file=sys.stderr)
        return 1
    kinds = [name for bit, name in ((native.SIMD_AVX512, "float32/int8 (AVX-512)"),
                                    (native.SIMD_AVX512_BF16, "bf16 (AVX512-BF16)")) if simd & bit]
    print(f"{path}\nABI {native.ABI_VERSION}; vectorised: {', '.join(kinds) or 'none (PyTorch kernels will be used)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
