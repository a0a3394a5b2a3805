-- lock_acquire.lua: one attempt to take a single lock, fairly (waiters are served in order).
-- KEYS[1] lock key (the user's name; value = token .. metadata, as bsm/redislock writes it)
-- KEYS[2] fence hash: field "n" = last fencing number, field "released" = last released token
-- KEYS[3] waiter queue (ZSET: token -> arrival order)
-- KEYS[4] waiter registrations (HASH: token -> "<deadline ms> <ttl ms> <value>")
-- ARGV[1] value (token .. metadata)   ARGV[2] token   ARGV[3] ttl in ms
-- ARGV[4] mode: "try"  take it if free and nobody live is queued first; drop my registration
--               "wait" the same, but stay registered as a waiter for ARGV[5] ms if not taken
--               "leave" never take it; drop my registration (report if it was handed to me)
-- ARGV[5] registration lifetime in ms (mode "wait")
-- Returns {1, fence} when this value holds the lock (taken now, or handed over by a
-- release), else {0, 0}.
local lock, fence, queue, waiters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value, token, mode = ARGV[1], ARGV[2], ARGV[4]

local function unregister()
  if redis.call("ZREM", queue, token) == 1 then
    redis.call("HDEL", waiters, token)
  end
end

local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- the first waiter whose registration is still alive (expired ones are dropped)
local function first_live(now)
  while true do
    local head = redis.call("ZRANGE", queue, 0, 0)[1]
    if not head then
      return nil
    end
    local info = redis.call("HGET", waiters, head)
    if info and tonumber(string.match(info, "^(%d+) ")) >= now then
      return head
    end
    redis.call("ZREM", queue, head)
    redis.call("HDEL", waiters, head)
  end
end

local current = redis.call("GET", lock)
if current == value then
  unregister()
  return {1, tonumber(redis.call("HGET", fence, "n") or "0")}
end
if mode == "leave" then
  unregister()
  return {0, 0}
end

local now = nil
if not current then
  local head = nil
  if redis.call("EXISTS", queue) == 1 then
    now = now_ms()
    head = first_live(now)
  end
  if head == nil or head == token then
    redis.call("SET", lock, value, "PX", ARGV[3])
    if head then
      unregister()
    end
    return {1, redis.call("HINCRBY", fence, "n", 1)}
  end
end

if mode == "wait" then
  now = now or now_ms()
  local lifetime = tonumber(ARGV[5])
  if not redis.call("ZSCORE", queue, token) then
    local last = redis.call("ZRANGE", queue, -1, -1, "WITHSCORES")[2]
    redis.call("ZADD", queue, (tonumber(last) or 0) + 1, token)
  end
  redis.call("HSET", waiters, token, (now + lifetime) .. " " .. ARGV[3] .. " " .. value)
  local keep = lifetime + 60000
  for _, key in ipairs({queue, waiters}) do
    if redis.call("PTTL", key) < keep then
      redis.call("PEXPIRE", key, keep)
    end
  end
else
  unregister()
end
return {0, 0}
