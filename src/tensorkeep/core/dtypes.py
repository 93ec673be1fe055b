"""safetensors dtype names <-> torch and NumPy dtypes."""

from __future__ import annotations

import numpy as np
import torch

#: Every torch dtype by name: its own ("float32", "bfloat16") and torch's aliases ("float", "long").
#: Read once from torch's namespace with vars(), which never runs torch's module ``__getattr__``:
#: ``getattr(torch, name)`` with a name from a file can import torch._inductor, torch.onnx, ...
TORCH_BY_NAME: dict[str, torch.dtype] = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}

_TORCH = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "C64": torch.complex64,
}
for _name, _attr in [
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
]:
    if _attr in TORCH_BY_NAME:  # newer torch versions only
        _TORCH[_name] = TORCH_BY_NAME[_attr]

_FROM_TORCH = {v: k for k, v in _TORCH.items()}

_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
}
_FROM_NUMPY = {v: k for k, v in _NUMPY.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name (``"F32"`` -> ``torch.float32``)."""
    return _TORCH[name]


def torch_dtype_named(name: object) -> torch.dtype | None:
    """The torch dtype called ``name`` (as ``str(dtype)`` writes it, without ``torch.``), or None.
    Safe on names read from a file: a fixed table, nothing is imported.

    >>> torch_dtype_named("bfloat16"), torch_dtype_named("long"), torch_dtype_named("_inductor")
    (torch.bfloat16, torch.int64, None)
    """
    return TORCH_BY_NAME.get(name) if type(name) is str else None


def numpy_dtype(name: str) -> np.dtype | None:
    """The NumPy dtype for a safetensors dtype name, or None (bf16, fp8 have none)."""
    return _NUMPY.get(name)


def name_of_torch(dtype: torch.dtype) -> str | None:
    return _FROM_TORCH.get(dtype)


def name_of_numpy(dtype: np.dtype) -> str | None:
    return _FROM_NUMPY.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's memory (copying only in torch's corner cases:
    a size-1 dimension may keep a non-unit stride even when ``is_contiguous()`` says True)."""
    flat = t.reshape(-1)
    if flat.stride(0) != 1:
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    return flat.view(torch.uint8)
