-- lock_obtain_multi.lua: take several locks with one value, all or none.
-- KEYS: for each lock i, two keys: lock, fence hash (see lock_acquire.lua); one hash slot.
-- ARGV[1] value (token .. metadata)   ARGV[2] ttl in ms   ARGV[3] token
-- A lock whose value starts with the token is already ours (redislock's custom token: its
-- holder may obtain it again): it is rewritten and its TTL renewed, and its fence stays.
-- Returns the list of fencing numbers (one per lock) when taken, else an empty list.
-- (Multi-key obtains do not queue behind single-lock waiters: they poll, like redislock.)
local n = #KEYS / 2
local token = ARGV[3]
local ours = {}
for i = 0, n - 1 do
  local key = KEYS[2 * i + 1]
  if redis.call("EXISTS", key) == 1 then
    local current = redis.pcall("GET", key)  -- (another type than a string: not ours)
    if type(current) ~= "string" or string.sub(current, 1, #token) ~= token then
      return {}
    end
    ours[i + 1] = true
  end
end
local fences = {}
for i = 0, n - 1 do
  redis.call("SET", KEYS[2 * i + 1], ARGV[1], "PX", ARGV[2])
  if ours[i + 1] then
    fences[i + 1] = tonumber(redis.call("HGET", KEYS[2 * i + 2], "n") or "0")
  else
    fences[i + 1] = redis.call("HINCRBY", KEYS[2 * i + 2], "n", 1)
  end
end
return fences
