"""The domain's exceptions; the server maps each to a gRPC status code in one table (server/translate.py).

Every message is written for the person reading the client's error: it says what went wrong and what to do.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of every expected serving failure; anything else is a bug and becomes INTERNAL."""


class ModelLoadError(ServingError):
    """The artifact directory cannot be served; the server refuses to start with this message."""


class InvalidChunkError(ServingError):
    """A chunk's inputs, flags or session id break the contract; nothing was applied."""


class ModelNotServedError(ServingError):
    """A request names a model (or a version of it) this server does not serve."""

    def __init__(self, name: str, version: str, served: str) -> None:
        which = f"{name!r} version {version!r}" if version else repr(name)
        super().__init__(f"model {which} is not served here: this server serves {served}")


class ModelNotNamedError(ServingError):
    """A request names no model, and the server serves several."""

    def __init__(self, served: str) -> None:
        super().__init__(
            f"this server serves several models ({served}): name one in the request's model field"
        )


class VersionUnavailableError(ServingError):
    """A new session asked for a version that takes none: it is draining (a newer one replaced it)."""

    def __init__(self, name: str, version: int, state: str) -> None:
        super().__init__(
            f"model {name!r} version {version} is {state} and takes no new sessions: leave model_version "
            "empty to begin on the newest ready version"
        )


class SessionPinnedError(ServingError):
    """A chunk names a version other than the one its session began on; a session never changes version."""

    def __init__(self, session_id: str, name: str, version: int) -> None:
        super().__init__(
            f"session {session_id!r} runs on model {name!r} version {version}, pinned at its start: "
            "name that version or none, or start a session with another id"
        )


class VersionRetiredError(ServingError):
    """The session's version was retired (drained past the deadline) and the session ended with it."""

    def __init__(self, session_id: str, name: str, version: int) -> None:
        super().__init__(
            f"session {session_id!r} ran on model {name!r} version {version}, which has been retired and "
            "ended it: start a new session (it begins on the newest ready version)"
        )


class InvalidSessionIdError(ServingError):
    """A session id breaks the id rules (1-128 characters of [A-Za-z0-9._:-])."""

    def __init__(self, session_id: str) -> None:
        shown = session_id if len(session_id) <= 140 else session_id[:140] + "..."
        super().__init__(f"session id {shown!r} is invalid: use 1-128 characters of A-Z a-z 0-9 . _ : -")


class SessionNotFoundError(ServingError):
    """The session is unknown: it was never started, has ended, or expired."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} expired or never started: send a chunk with start to begin it"
        )


class SessionNotServedError(ServingError):
    """A continuing session is live on none of the model's versions this server holds."""

    def __init__(self, session_id: str, name: str, versions: str) -> None:
        super().__init__(
            f"session {session_id!r} is live on no version of model {name!r} this server holds ({versions}): "
            "it expired, never started, or began on a version this server has not loaded; start it again, "
            "or send it to a server that holds its version",
        )


class SessionAlreadyExistsError(ServingError):
    """`start` named a live session; starting would silently discard its state."""

    def __init__(self, session_id: str, steps: int) -> None:
        super().__init__(
            f"session {session_id!r} is already live at {steps} steps: continue it with offset {steps}, "
            "pick another id, or send start with reset to restart it"
        )


class OffsetMismatchError(ServingError):
    """The chunk's offset is not the session's step count; the message carries the server's count."""

    def __init__(self, session_id: str, offset: int, steps: int) -> None:
        super().__init__(
            f"session {session_id!r} has consumed {steps} steps but the chunk's offset is {offset}: "
            f"resend from offset {steps}"
        )
        self.steps = steps


class SessionMovedError(ServingError):
    """Another server applied a chunk to the session while this one ran its chunk (a shared store's
    compare-and-set refused the stale write). The engine answers again from the session as it now stands;
    only a session that keeps moving under it reaches the client (ABORTED: resend at the server's count)."""

    def __init__(self, session_id: str, steps: int) -> None:
        super().__init__(
            f"session {session_id!r} was advanced to {steps} steps by another server while this chunk ran: "
            f"resend from offset {steps}"
        )
        self.steps = steps


class ReplayNotKeptError(ServingError):
    """A retry of a chunk that was applied, whose response was too large to keep for retries."""

    def __init__(self, session_id: str, offset: int, steps: int, budget: int) -> None:
        super().__init__(
            f"the chunk at offset {offset} of session {session_id!r} was applied, but its response was "
            f"larger than the {budget} bytes a session keeps for retries: it is not applied twice; go on "
            f"from offset {steps}"
        )


class CapacityExceededError(ServingError):
    """The server holds its maximum number of sessions and is configured not to evict."""

    def __init__(self, max_sessions: int) -> None:
        super().__init__(
            f"the server is at its capacity of {max_sessions} sessions: end idle sessions or retry later"
        )


class QuotaExceededError(ServingError):
    """The tenant holds as many sessions as its quota allows."""

    def __init__(self, tenant: str, quota: int) -> None:
        super().__init__(
            f"tenant {tenant!r} is at its quota of {quota} sessions: end idle sessions, or ask for a larger "
            "quota"
        )


class UnauthenticatedError(ServingError):
    """The call carries no bearer token, or one the server does not know."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"{reason}: send metadata 'authorization: Bearer <token>' with a token of this server"
        )


class InvalidSnapshotError(ServingError):
    """The snapshot blob is not one this server wrote (truncated, corrupt, or another format)."""


class SnapshotModelMismatchError(ServingError):
    """The snapshot was taken on a different model; its state means nothing to this one."""

    def __init__(self, snapshot_fingerprint: str, model_fingerprint: str) -> None:
        super().__init__(
            f"the snapshot was taken on model {snapshot_fingerprint[:12]} but this server runs "
            f"{model_fingerprint[:12]}: restore it on a replica serving that model"
        )


class StoreUnavailableError(ServingError):
    """The session store cannot be reached (or refused the operation); nothing was applied. Retryable."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"the session store is unreachable ({detail}): nothing was applied; "
            "retry the chunk with the same offset"
        )


class ShuttingDownError(ServingError):
    """The server is draining and takes no new chunks."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down: reconnect, or send the chunk to another replica")
