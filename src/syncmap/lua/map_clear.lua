-- map_clear: delete every entry of a SyncMap in one step, and tell every node ("C" message).
-- The record keys are computed from the index (same hash tag, so the same slot on a Cluster).
-- KEYS[1] meta hash {epoch, seq}   KEYS[2] idx zset
-- ARGV[1] record key prefix   ARGV[2] channel   ARGV[3] epoch candidate (used if meta is missing)
-- Returns {epoch, seq, number of entries deleted}
local names = redis.call('ZRANGE', KEYS[2], 0, -1)
local batch = {}
for i, k in ipairs(names) do
  batch[#batch + 1] = ARGV[1] .. k
  if #batch == 500 then
    redis.call('DEL', unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('DEL', unpack(batch)) end
redis.call('DEL', KEYS[2])
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('SPUBLISH', ARGV[2], 'SM1 ' .. epoch .. ' ' .. string.format('%d', seq) .. ' C ')
return {epoch, seq, #names}
