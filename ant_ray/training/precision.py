"""Mixed precision: the config's `mixed_precision` value -> the autocast dtype (None: full precision)."""

from __future__ import annotations

import torch

AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
