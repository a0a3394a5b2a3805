-- map_len: the number of live entries of a SyncMap (drops expired entries from the index first).
-- KEYS[1] idx zset (score: expiry in ms, or +inf)
-- Returns the count.
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%d', ms))
return redis.call('ZCARD', KEYS[1])
