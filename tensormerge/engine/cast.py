"""Results into the output dtype, checked after the cast.

A finite float32 result can still be written as inf: 70000 in a float16 checkpoint, a value
past float32's largest in bfloat16 after rounding, a float64 one in float32. So finiteness is
checked on the cast buffer, the one pass over memory the check needs (and the smaller buffer);
the float32 result is looked at again only to name what went wrong.
"""

from __future__ import annotations

import torch

from tensormerge.errors import InputError
from tensormerge.kernels.reference import all_finite


def store_checked(name: str, result: torch.Tensor, dst: torch.Tensor) -> None:
    """dst.copy_(result), refused in one line if a value is not finite in dst's dtype."""
    dst.copy_(result)
    if all_finite(dst):
        return
    if not all_finite(result):
        raise InputError(f"tensor {name!r}: the merge produced NaN or Inf (non-finite input values?)")
    first = int(torch.isfinite(dst.reshape(-1)).logical_not_().nonzero()[0])
    value = result.reshape(-1)[first].item()
    raise InputError(f"tensor {name!r}: merged value {value:.9g} overflows {str(dst.dtype).removeprefix('torch.')} "
                     f"(largest finite {torch.finfo(dst.dtype).max:.9g})")
