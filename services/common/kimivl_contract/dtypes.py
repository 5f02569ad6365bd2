"""The TensorDtype table: each enum value's name and element size, in one place.

Names are numpy's and torch's attribute names alike (``bfloat16`` through ml_dtypes on the
numpy side). TENSOR_DTYPE_UNSPECIFIED means bfloat16, the model's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

from kimivl.v1 import types_pb2


@dataclass(frozen=True)
class WireDtype:
    name: str
    itemsize: int
    proto: int  # the canonical TensorDtype value


BFLOAT16 = WireDtype("bfloat16", 2, types_pb2.TENSOR_DTYPE_BFLOAT16)
FLOAT16 = WireDtype("float16", 2, types_pb2.TENSOR_DTYPE_FLOAT16)
FLOAT32 = WireDtype("float32", 4, types_pb2.TENSOR_DTYPE_FLOAT32)
UINT8 = WireDtype("uint8", 1, types_pb2.TENSOR_DTYPE_UINT8)  # raw pixels, normalized by the inference tier

BY_PROTO: dict[int, WireDtype] = {types_pb2.TENSOR_DTYPE_UNSPECIFIED: BFLOAT16,
                                  **{d.proto: d for d in (BFLOAT16, FLOAT16, FLOAT32, UINT8)}}
BY_NAME: dict[str, WireDtype] = {d.name: d for d in (BFLOAT16, FLOAT16, FLOAT32, UINT8)}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def from_proto(value: int, field: str = "dtype") -> WireDtype:
    """The dtype of a TensorDtype number (proto3 enums are open: any number can arrive)."""
    from .errors import RequestError

    try:
        return BY_PROTO[value]
    except KeyError:
        raise RequestError(f"{field} is {value}, not a TensorDtype; use one of "
                           f"{', '.join(types_pb2.TensorDtype.keys())}", field=field) from None


def from_name(name: str) -> WireDtype:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {NAMES}, got {name!r}") from None
