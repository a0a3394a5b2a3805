-- lock_release.lua: release one or more locks held with one value, and hand each over to its
-- first live waiter (the waiter is woken through its own list, with its fencing number).
-- KEYS: for each lock i, three keys: lock, fence hash, waiter queue (see lock_acquire.lua);
--       all share one hash slot.
-- ARGV[1] value (token .. metadata)
-- ARGV[2] this acquisition's mark: its token and (first) fence, e.g. "<token> 42"; the last
--         release of each lock leaves it in the fence hash ("released"), so that a retried
--         release is recognised, and a token used again (a caller's own) is not mistaken
--         for its earlier acquisition
-- ARGV[2 + 2i + 1] wake-list prefix of lock i, ARGV[2 + 2i + 2] its registration key prefix
--       (the waiter's token is appended to each)
-- Returns 1 released; 2 not held now, but this acquisition's release already happened (a retried
-- release whose first answer was lost); 0 not held (expired, or taken by another holder).
-- The answers are syncmap._core.replies.ReleaseStatus.
local value, mark = ARGV[1], ARGV[2]
local n = #KEYS / 3

for i = 0, n - 1 do
  if redis.call("GET", KEYS[3 * i + 1]) ~= value then
    if redis.call("HGET", KEYS[3 * i + 2], "released") == mark then
      return 2
    end
    return 0
  end
end

for i = 0, n - 1 do
  local lock, fence, queue = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  redis.call("HSET", fence, "released", mark)
  local handed = false
  while not handed do
    local head = redis.call("ZPOPMIN", queue)[1]
    if not head then
      break
    end
    -- a registration that ran out is a dead waiter: skip it
    local info = redis.call("GETDEL", ARGV[2 + 2 * i + 2] .. head)
    if info then
      local ttl, next_value = string.match(info, "^(%d+) (.*)$")
      redis.call("SET", lock, next_value, "PX", ttl)
      local wake = ARGV[2 + 2 * i + 1] .. head
      redis.call("RPUSH", wake, redis.call("HINCRBY", fence, "n", 1))
      redis.call("PEXPIRE", wake, 60000)
      handed = true
    end
  end
  if not handed then
    redis.call("DEL", lock)
  end
end
return 1
