"""What this machine computes natively: shared by training (bfloat16 autocast) and prediction (engine precision)."""

from __future__ import annotations

import torch


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively; elsewhere bfloat16 autocast is emulated and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence looked up defensively
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
