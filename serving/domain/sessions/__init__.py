"""Sessions: the store interface and the in-memory store, and the parts over any store (the lifecycle policy,
ended sessions' replays, the snapshot codec)."""
