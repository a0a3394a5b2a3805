-- lock_pttl.lua: the remaining TTL of locks held with one value (the shortest of them).
-- KEYS: the lock keys (one hash slot)
-- ARGV[1] value (token .. metadata)
-- Returns the TTL in ms (-1: no expiry), or -3 when not held (some key has another value).
-- (-3 is syncmap._core.replies.PTTL_NOT_HELD.)
local shortest = nil
for _, key in ipairs(KEYS) do
  if redis.call("GET", key) ~= ARGV[1] then
    return -3
  end
  local ttl = redis.call("PTTL", key)
  if shortest == nil or (ttl >= 0 and (shortest < 0 or ttl < shortest)) then
    shortest = ttl
  end
end
return shortest
