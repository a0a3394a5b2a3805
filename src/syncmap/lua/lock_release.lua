-- lock_release.lua: release one or more locks held with one value, and hand each over to its
-- first live waiter (the waiter is woken through its own list, with its fencing number).
-- KEYS: for each lock i, four keys: lock, fence hash, waiter queue, waiter registrations
--       (see lock_acquire.lua); all share one hash slot.
-- ARGV[1] value (token .. metadata)   ARGV[2] token
-- ARGV[2 + i] wake-list prefix of lock i (the waiter's token is appended)
-- Returns 1 released; 2 not held now, but this token's release already happened (a retried
-- release whose first answer was lost); 0 not held (expired, or taken by another holder).
local value, token = ARGV[1], ARGV[2]
local n = #KEYS / 4

for i = 0, n - 1 do
  if redis.call("GET", KEYS[4 * i + 1]) ~= value then
    if redis.call("HGET", KEYS[4 * i + 2], "released") == token then
      return 2
    end
    return 0
  end
end

local now = nil
for i = 0, n - 1 do
  local lock, fence, queue, waiters = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3], KEYS[4 * i + 4]
  redis.call("DEL", lock)
  redis.call("HSET", fence, "released", token)
  while redis.call("EXISTS", queue) == 1 do
    if not now then
      local t = redis.call("TIME")
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    local head = redis.call("ZRANGE", queue, 0, 0)[1]
    local info = redis.call("HGET", waiters, head) or ""
    redis.call("ZREM", queue, head)
    redis.call("HDEL", waiters, head)
    local deadline, ttl, next_value = string.match(info, "^(%d+) (%d+) (.*)$")
    if deadline and tonumber(deadline) >= now then
      redis.call("SET", lock, next_value, "PX", ttl)
      local next_fence = redis.call("HINCRBY", fence, "n", 1)
      local wake = ARGV[2 + i + 1] .. head
      redis.call("RPUSH", wake, next_fence)
      redis.call("PEXPIRE", wake, 60000)
      break
    end
  end
end
return 1
