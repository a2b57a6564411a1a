"""numpy / torch / MetaTensor inputs as plain torch tensors, without copying (the one place this is done)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["numpy_as_tensor", "as_tensor", "numpy_dtype"]

_NUMPY_FLOATS = (np.float16, np.float32, np.float64)


def numpy_as_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``a``'s memory whatever its strides (no copy of a Fortran-ordered or transposed volume);
    only negative strides (``np.flip`` views) or a non-native byte order are copied."""
    try:
        return torch.from_numpy(a)
    except ValueError:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")))


def as_tensor(x: Any, name: str = "probs", floating: bool = True) -> tuple[torch.Tensor, bool]:
    """``(plain torch.Tensor, was_numpy)`` for a numpy array, torch tensor or ``MetaTensor`` (no copy).

    With ``floating=True`` a numpy array must hold float16/float32/float64 values; other dtypes (integers, bool,
    complex, object, ``longdouble``) raise a ``TypeError`` that names the fix.  Tensor dtypes are checked by the
    caller (the solver's own check names the fix for them).
    """
    if isinstance(x, np.ndarray):
        if floating and x.dtype.type not in _NUMPY_FLOATS:
            if x.dtype.kind == "c":
                raise TypeError(f"{name} is complex: pass real-valued probabilities")
            if x.dtype.kind == "f":  # float128 / longdouble: torch has no such dtype
                raise TypeError(f"{name} has dtype {x.dtype}, which torch cannot hold: convert it first with "
                                f"{name}.astype(np.float32) (or np.float64)")
            if x.dtype.kind in "iub":
                raise TypeError(f"{name} has dtype {x.dtype}: pass floating-point probabilities; for a label map use "
                                "monai.transforms.AsDiscrete(to_onehot=C) instead of RankSEG")
            raise TypeError(f"{name} has dtype {x.dtype}: pass a floating-point numpy array (e.g. "
                            f"np.asarray({name}, dtype=np.float32))")
        return numpy_as_tensor(x), True
    if isinstance(x, torch.Tensor):
        return (x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x), False
    raise TypeError(f"{name} must be a torch.Tensor, MetaTensor or numpy.ndarray, got {type(x).__name__}")


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (``ValueError`` naming the fix for bfloat16, which numpy lacks)."""
    if dtype == torch.bfloat16:
        raise ValueError("bfloat16 has no numpy dtype: use torch.float32 or an integer dtype for numpy output, or "
                         "pass a torch tensor")
    return torch.empty(0, dtype=dtype).numpy().dtype
