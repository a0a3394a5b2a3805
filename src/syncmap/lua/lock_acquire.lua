-- lock_acquire.lua: one attempt to take a single lock, fairly (waiters are served in order).
-- KEYS[1] lock key (the user's name; value = token .. metadata, as bsm/redislock writes it)
-- KEYS[2] fence hash: field "n" = last fencing number, field "released" = last released token
-- KEYS[3] waiter queue (ZSET: token -> arrival order)
-- KEYS[4] (optional) this token's wake list: emptied once the lock is found handed over (the
--         waiter's wait timed out just as a release pushed its wake-up) or when leaving
-- ARGV[1] value (token .. metadata)   ARGV[2] token   ARGV[3] ttl in ms
-- ARGV[4] mode: "try"  take it if free and nobody live is queued first; drop my registration
--               "wait" the same, but stay registered as a waiter for ARGV[5] ms if not taken
--               "queue" as "wait", and when it holds the lock, push the fence onto its wake
--                       list too: the client sends BLPOP on that list right behind this
--                       script, in the same write, and that wait then returns at once
--               "leave" never take it; drop my registration (report if it was handed to me)
-- ARGV[5] registration lifetime in ms (mode "wait")
-- ARGV[6] registration key prefix: a waiter's registration is the string key
--         ARGV[6] .. token = "<ttl ms> <value>", which expires with PX <lifetime>: a waiter
--         whose registration is gone is taken for dead.
-- Returns the fencing number when this value holds the lock (taken now, or handed over by a
-- release), else false (nil). (A number, not a table: Valkey converts a table answer field by
-- field and it is garbage for the Lua collector, ~1 µs of the server's time per call.)
-- Parsed by syncmap._core.replies.AcquireReply.
local lock, fence, queue = KEYS[1], KEYS[2], KEYS[3]
local value, token, mode, regs = ARGV[1], ARGV[2], ARGV[4], ARGV[6]
-- Straight-line code, no closures or helper functions: this script runs on every acquire, and
-- every object it makes is garbage that the server's Lua collector sweeps (as map_write.lua).
-- Each branch sets `held` (the fencing number when this value holds the lock, else false) and
-- `drop` (leave the queue: remove my registration); both are acted on at the end.
local held, drop = false, false

-- ours: the value starts with this token. Handed over to it by a release; or taken again with
-- a caller's own token (redislock's custom token: its holder may obtain it again, which
-- rewrites the value and renews the TTL; the fence stays).
local current = redis.call("GET", lock)
local ours = current and string.sub(current, 1, #token) == token
if ours or mode == "leave" then
  drop = true
  if KEYS[4] then
    redis.call("DEL", KEYS[4])
  end
  if ours then
    if mode ~= "leave" then
      redis.call("SET", lock, value, "PX", ARGV[3])
    end
    held = tonumber(redis.call("HGET", fence, "n") or "0")
  end
else
  if not current then
    -- the first waiter whose registration is still alive (dead ones are dropped); I count as
    -- live
    local head = redis.call("ZRANGE", queue, 0, 0)[1]
    while head and head ~= token and redis.call("EXISTS", regs .. head) == 0 do
      redis.call("ZREM", queue, head)
      head = redis.call("ZRANGE", queue, 0, 0)[1]
    end
    if head == nil or head == token then
      redis.call("SET", lock, value, "PX", ARGV[3])
      drop = head ~= nil
      held = redis.call("HINCRBY", fence, "n", 1)
    end
  end
  if not held then
    if mode == "wait" or mode == "queue" then
      local lifetime = tonumber(ARGV[5])
      local last = redis.call("ZRANGE", queue, -1, -1, "WITHSCORES")
      redis.call("ZADD", queue, "NX", (tonumber(last[2]) or 0) + 1, token)
      redis.call("SET", regs .. token, ARGV[3] .. " " .. value, "PX", lifetime)
      -- the queue outlives every registration in it (GT: never shorten a longer waiter's)
      if last[1] then
        redis.call("PEXPIRE", queue, lifetime + 60000, "GT")
      else
        redis.call("PEXPIRE", queue, lifetime + 60000)
      end
    else
      drop = true
    end
  end
end

if drop and redis.call("ZREM", queue, token) == 1 then
  redis.call("DEL", regs .. token)
end
-- "queue": the fence goes onto the wake list too, for the BLPOP sent behind this script
if held and mode == "queue" then
  redis.call("RPUSH", KEYS[4], held)
  redis.call("PEXPIRE", KEYS[4], 60000)
end
return held
