-- lock_obtain_multi.lua: take several locks with one value, all or none.
-- KEYS: for each lock i, two keys: lock, fence hash (see lock_acquire.lua); one hash slot.
-- ARGV[1] value (token .. metadata)   ARGV[2] ttl in ms
-- Returns the list of fencing numbers (one per lock) when taken, else an empty list.
-- (Multi-key obtains do not queue behind single-lock waiters: they poll, like redislock.)
local n = #KEYS / 2
for i = 0, n - 1 do
  if redis.call("EXISTS", KEYS[2 * i + 1]) == 1 then
    return {}
  end
end
local fences = {}
for i = 0, n - 1 do
  redis.call("SET", KEYS[2 * i + 1], ARGV[1], "PX", ARGV[2])
  fences[i + 1] = redis.call("HINCRBY", KEYS[2 * i + 2], "n", 1)
end
return fences
