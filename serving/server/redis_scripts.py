"""The Redis store's Lua scripts (each runs atomically on the server) and its replay encoding.

A session is a hash {prefix}s:{id} with fields steps, created, used, state, replay, indexed by two sorted
sets: {prefix}used (score: last use) and {prefix}born (score: creation).
"""

from __future__ import annotations

import struct

import numpy as np

from serving.domain.sessions.store import Replay

_REPLAY_HEADER = struct.Struct("<16sQII")  # replay key, offset, rows, columns; then float32 outputs

# KEYS: hash, used. ARGV: now, id, ttl_ms. The fields as they were; the look-up counts as a use.
GET = """
local v = redis.call('HMGET', KEYS[1], 'steps', 'created', 'used', 'state', 'replay')
if not v[1] then return false end
redis.call('HSET', KEYS[1], 'used', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return v
"""
# KEYS: hash, used, born. ARGV: id, steps, created, used, state, replay, ttl_ms, expected steps ('' = create).
WRITE = """
local current = redis.call('HGET', KEYS[1], 'steps')
if ARGV[8] == '' then
  if current then return 0 end
elseif current ~= ARGV[8] then
  return 0
end
redis.call('HSET', KEYS[1], 'steps', ARGV[2], 'created', ARGV[3], 'used', ARGV[4], 'state', ARGV[5],
           'replay', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"""
END = """
local v = redis.call('HMGET', KEYS[1], 'steps', 'created', 'used', 'state', 'replay')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if not v[1] then return false end
return v
"""
# KEYS: used, born. ARGV: used cutoff, born cutoff, limit, hash prefix.
# Returns {more, count, then id, reason, fields for each session removed}.
EXPIRE = """
local idle = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[3])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
local limit = tonumber(ARGV[3])
local out = {(#idle == limit or #old == limit) and 1 or 0, 0}
local seen = {}
for _, list in ipairs({old, idle}) do
  for _, id in ipairs(list) do
    if not seen[id] then
      seen[id] = true
      local key = ARGV[4] .. id
      local v = redis.call('HMGET', key, 'steps', 'created', 'used', 'state', 'replay')
      local reason = 'ttl'
      if v[1] and tonumber(v[2]) < tonumber(ARGV[2]) then reason = 'lifetime' end
      redis.call('DEL', key)
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZREM', KEYS[2], id)
      table.insert(out, id)
      table.insert(out, reason)
      table.insert(out, v)
    end
  end
end
out[2] = redis.call('ZCARD', KEYS[1])
return out
"""
OLDEST = "return redis.call('ZRANGE', KEYS[1], 0, 0)"

SCRIPTS = {"get": GET, "write": WRITE, "end": END, "expire": EXPIRE, "oldest": OLDEST}


_NOT_KEPT = 0xFFFFFFFF  # rows of a replay whose outputs were not kept (over the replay budget)


def encode_replay(replay: Replay) -> bytes:
    if replay.outputs is None:
        return _REPLAY_HEADER.pack(replay.key, replay.offset, _NOT_KEPT, 0)
    rows, columns = replay.outputs.shape
    header = _REPLAY_HEADER.pack(replay.key, replay.offset, rows, columns)
    return header + replay.outputs.astype("<f4", copy=False).tobytes()


def decode_replay(blob: bytes) -> Replay:
    key, offset, rows, columns = _REPLAY_HEADER.unpack_from(blob)
    if rows == _NOT_KEPT:
        return Replay(key, offset, None)
    outputs = np.frombuffer(blob, "<f4", rows * columns, _REPLAY_HEADER.size).reshape(rows, columns)
    return Replay(key, offset, outputs)
