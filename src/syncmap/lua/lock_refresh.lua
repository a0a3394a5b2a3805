-- lock_refresh.lua: extend the TTL of locks held with one value (all of them, or none).
-- KEYS: the lock keys (one hash slot)
-- ARGV[1] value (token .. metadata)   ARGV[2] new ttl in ms
-- Returns 1 refreshed, 0 not held (some key has another value or none).
for _, key in ipairs(KEYS) do
  if redis.call("GET", key) ~= ARGV[1] then
    return 0
  end
end
for _, key in ipairs(KEYS) do
  redis.call("PEXPIRE", key, ARGV[2])
end
return 1
