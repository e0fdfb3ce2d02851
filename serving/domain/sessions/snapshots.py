"""The snapshot codec: a session's state and step count as an opaque, self-checking blob, and back.

Blob (format 2): a header (magic, format version, sha256 of the model, floats of state, steps), the state
row's float32 bytes (little-endian), then a CRC32 of all before. A blob restores only on a server of the same
model. Format 1 blobs (an LSTM's (2, layers, hidden) state: the same floats in the same order as its state
row) still restore.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from serving.domain.errors import InvalidSnapshotError, SnapshotModelMismatchError

_MAGIC = b"CVYSNAP"
_VERSION = 2
_HEADER = struct.Struct("<7sB32sQQ")  # magic, version, sha256 of model.onnx, floats of state, steps
_HEADER_V1 = struct.Struct("<7sB32sIIQ")  # magic, version, sha256 of model.onnx, layers, hidden, steps
_CRC = struct.Struct("<I")


class SnapshotCodec:
    """Snapshots of state rows of `state_size` floats for the model with sha256 `fingerprint` (hex)."""

    def __init__(self, fingerprint: str, state_size: int) -> None:
        self._fingerprint = bytes.fromhex(fingerprint)
        self._size = state_size
        self._zeros = np.zeros(state_size, np.float32)  # shared by every fresh start
        self._zeros.flags.writeable = False

    def initial(self, blob: bytes) -> tuple[np.ndarray, int]:
        """A new session's state and step count: zeros and 0, or restored from a snapshot `blob`."""
        return self.decode(blob) if blob else (self._zeros, 0)

    def encode(self, state: np.ndarray, steps: int) -> bytes:
        """The blob of a session at `steps` with `state`."""
        body = _HEADER.pack(_MAGIC, _VERSION, self._fingerprint, self._size, steps)
        body += state.astype("<f4", copy=False).tobytes()
        return body + _CRC.pack(zlib.crc32(body))

    def decode(self, blob: bytes) -> tuple[np.ndarray, int]:
        """The state and step count in `blob`; `InvalidSnapshotError` or `SnapshotModelMismatchError`."""
        if len(blob) < _HEADER_V1.size or blob[: len(_MAGIC)] != _MAGIC:
            raise InvalidSnapshotError("the snapshot is not a Conveyor snapshot")
        version = blob[len(_MAGIC)]
        if version == _VERSION:
            _, _, fingerprint, floats, steps = _HEADER.unpack_from(blob)
            header = _HEADER.size
        elif version == 1:
            _, _, fingerprint, layers, hidden, steps = _HEADER_V1.unpack_from(blob)
            floats, header = 2 * layers * hidden, _HEADER_V1.size
        else:
            raise InvalidSnapshotError(f"snapshot format version {version} is not supported (1 or 2)")
        size = header + floats * 4 + _CRC.size
        if len(blob) != size or _CRC.unpack_from(blob, size - _CRC.size)[0] != zlib.crc32(blob[: -_CRC.size]):
            raise InvalidSnapshotError("the snapshot is truncated or corrupt (checksum mismatch)")
        if fingerprint != self._fingerprint:
            raise SnapshotModelMismatchError(fingerprint.hex(), self._fingerprint.hex())
        if floats != self._size:
            raise InvalidSnapshotError(f"the snapshot holds {floats} floats of state, not {self._size}")
        state = np.frombuffer(blob, "<f4", floats, header)
        if not np.isfinite(state).all():
            raise InvalidSnapshotError("the snapshot's state is not finite")
        return state.astype(np.float32), steps
