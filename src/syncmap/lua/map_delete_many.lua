-- map_delete_many: delete a batch of SyncMap entries in one step, each deleted one with its own
-- seq, and tell every node with one change message for the batch (none if nothing existed).
-- Change message = "SM1 " .. epoch .. " " .. first seq .. " B " .. one "D" .. #key .. " " .. key
-- per deleted entry, in seq order.
-- KEYS[1] meta hash {epoch, seq}   KEYS[2] idx zset   KEYS[2 + i] the record of entry i
-- ARGV[1] epoch candidate (used if meta is missing)   ARGV[2] channel
-- ARGV[2 + i] the key of entry i
-- Returns {epoch or false, seq, number deleted}: seq is the map's seq after the call (every
-- entry of the batch is absent as of it)
-- Parsed by syncmap._core.replies.DeleteManyReply.
local gone, message = {}, {}
for i = 1, #KEYS - 2 do
  if redis.call('DEL', KEYS[2 + i]) == 1 then
    local key = ARGV[2 + i]
    gone[#gone + 1] = key
    message[#message + 1] = 'D' .. #key .. ' ' .. key
  end
end
if #gone == 0 then
  local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
  return {m[1], tonumber(m[2] or '0'), 0}
end
redis.call('ZREM', KEYS[2], unpack(gone))
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local last = redis.call('HINCRBY', KEYS[1], 'seq', #gone)
redis.call('SPUBLISH', ARGV[2], 'SM1 ' .. epoch .. ' ' .. string.format('%d', last - #gone + 1)
  .. ' B ' .. table.concat(message))
return {epoch, last, #gone}
