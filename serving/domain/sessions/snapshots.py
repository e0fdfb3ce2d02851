"""The snapshot codec: a session's state and step count as an opaque, self-checking blob, and back.

Blob: a header (magic, format version, sha256 of the model, layers, hidden, steps), the state's float32 bytes
(little-endian, C order), then a CRC32 of all before. A blob restores only on a server of the same model.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from serving.domain.errors import InvalidSnapshotError, SnapshotModelMismatchError

_MAGIC = b"CVYSNAP"
_VERSION = 1
_HEADER = struct.Struct("<7sB32sIIQ")  # magic, version, sha256 of model.onnx, layers, hidden, steps
_CRC = struct.Struct("<I")


class SnapshotCodec:
    """Snapshots of states of shape (2, layers, hidden) for the model with sha256 `fingerprint` (hex)."""

    def __init__(self, fingerprint: str, state_shape: tuple[int, int, int]) -> None:
        self._fingerprint = bytes.fromhex(fingerprint)
        self._shape = state_shape
        self._zeros = np.zeros(state_shape, np.float32)  # shared by every fresh start
        self._zeros.flags.writeable = False

    def initial(self, blob: bytes) -> tuple[np.ndarray, int]:
        """A new session's state and step count: zeros and 0, or restored from a snapshot `blob`."""
        return self.decode(blob) if blob else (self._zeros, 0)

    def encode(self, state: np.ndarray, steps: int) -> bytes:
        """The blob of a session at `steps` with `state`."""
        layers, hidden = self._shape[1:]
        body = _HEADER.pack(_MAGIC, _VERSION, self._fingerprint, layers, hidden, steps)
        body += state.astype("<f4", copy=False).tobytes()
        return body + _CRC.pack(zlib.crc32(body))

    def decode(self, blob: bytes) -> tuple[np.ndarray, int]:
        """The state and step count in `blob`; `InvalidSnapshotError` or `SnapshotModelMismatchError`."""
        if len(blob) < _HEADER.size or blob[: len(_MAGIC)] != _MAGIC:
            raise InvalidSnapshotError("the snapshot is not a Conveyor snapshot")
        _, version, fingerprint, layers, hidden, steps = _HEADER.unpack_from(blob)
        if version != _VERSION:
            raise InvalidSnapshotError(f"snapshot format version {version} is not supported (expected 1)")
        size = _HEADER.size + 2 * layers * hidden * 4 + _CRC.size
        if len(blob) != size or _CRC.unpack_from(blob, size - _CRC.size)[0] != zlib.crc32(blob[: -_CRC.size]):
            raise InvalidSnapshotError("the snapshot is truncated or corrupt (checksum mismatch)")
        if fingerprint != self._fingerprint:
            raise SnapshotModelMismatchError(fingerprint.hex(), self._fingerprint.hex())
        if (2, layers, hidden) != self._shape:
            raise InvalidSnapshotError(
                f"the snapshot holds state for {layers} layers x {hidden}, "
                f"not {self._shape[1]} x {self._shape[2]}"
            )
        state = np.frombuffer(blob, "<f4", 2 * layers * hidden, _HEADER.size).reshape(self._shape)
        if not np.isfinite(state).all():
            raise InvalidSnapshotError("the snapshot's state is not finite")
        return state.astype(np.float32), steps
