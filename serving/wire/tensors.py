"""Raw little-endian tensors on the wire <-> numpy arrays, shared by the servicer and the client.

Decoding reads the bytes field once (protobuf hands out a copy on each read) and views it: the array is
read-only and shares those bytes. Encoding copies once, into the message's bytes field.
"""

from __future__ import annotations

import math

import numpy as np

from serving.wire import pb

_WIRE_DTYPES: dict[pb.DType.ValueType, np.dtype[np.generic]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}
_PROTO_DTYPES = {dtype: code for code, dtype in _WIRE_DTYPES.items()}


class TensorDecodeError(ValueError):
    """The bytes and the declared dtype and shape of a Tensor do not agree."""


def decode(tensor: pb.Tensor) -> np.ndarray:
    """View a Tensor's bytes as a read-only numpy array of its dtype and shape (no copy)."""
    dtype = _WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise TensorDecodeError(
            f"unsupported tensor dtype {_dtype_name(tensor.dtype)}: send FLOAT32 or INT64"
        )
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise TensorDecodeError(f"tensor shape {list(shape)} has a negative dimension")
    data = tensor.data  # each access copies the bytes out of the message: read it once
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise TensorDecodeError(
            f"tensor data has {len(data)} bytes but shape {list(shape)} of "
            f"{pb.DType.Name(tensor.dtype)} needs {expected}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:  # e.g. [0, 2**61]: no bytes, yet a dimension no array can have
        raise TensorDecodeError(f"tensor shape {list(shape)} cannot be held in memory ({exc})") from None


def _dtype_name(number: pb.DType.ValueType) -> str:
    # A number the proto does not define (a newer client, or a broken one) has no name to show.
    return pb.DType.Name(number) if number in pb.DType.values() else str(int(number))


def encode(array: np.ndarray) -> pb.Tensor:
    """A Tensor holding array's elements as little-endian bytes (float32 or int64 only)."""
    wire = array.dtype.newbyteorder("<")
    code = _PROTO_DTYPES.get(wire)
    if code is None:
        raise TypeError(f"cannot send arrays of dtype {array.dtype}: use float32 or int64")
    data = np.ascontiguousarray(array, dtype=wire).tobytes()
    return pb.Tensor(dtype=code, shape=array.shape, data=data)
