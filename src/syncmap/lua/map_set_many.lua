-- map_set_many: write a batch of SyncMap entries in one step (update), each with its own seq,
-- and tell every node with one change message for the whole batch.
-- Record = "SM\1" .. epoch .. " " .. seq .. "\n" .. payload (as map_write).
-- Change message = "SM1 " .. epoch .. " " .. first seq .. " B " .. the changes, in seq order:
--   "V" .. #key .. " " .. key .. #payload .. " " .. payload   (a value carried: no expiry and
--                                                              at most ARGV[4] bytes)
--   "S" .. #key .. " " .. key                                 (else)
-- KEYS[1] meta hash {epoch, seq}   KEYS[2] idx zset   KEYS[2 + i] the record of entry i
-- ARGV[1] epoch candidate (used if meta is missing)   ARGV[2] channel
-- ARGV[3] px: expiry in ms of every entry, 0 = none
-- ARGV[4] push limit: carry payloads up to this many bytes in the change message (0 = never)
-- ARGV[3 + 2i] the key of entry i   ARGV[4 + 2i] its payload
-- Returns {epoch, seq of the last entry, pttl (-1: none)}; entry i's seq is last - n + i
-- Parsed by syncmap._core.replies.SetManyReply.
local n = #KEYS - 2
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local last = redis.call('HINCRBY', KEYS[1], 'seq', n)
local first = last - n + 1
local px = tonumber(ARGV[3])
local limit = px > 0 and -1 or (tonumber(ARGV[4]) or 0)
local head = 'SM\1' .. epoch .. ' '
local set, index, message = {}, {}, {}
local score = '+inf'
if px > 0 then
  local now = redis.call('TIME')
  score = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + px
end
for i = 1, n do
  local key, payload = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  local record = head .. string.format('%d', first + i - 1) .. '\n' .. payload
  if px > 0 then
    redis.call('SET', KEYS[2 + i], record, 'PX', px)
  else
    set[2 * i - 1] = KEYS[2 + i]
    set[2 * i] = record
  end
  index[2 * i - 1] = score
  index[2 * i] = key
  if #payload <= limit then
    message[i] = 'V' .. #key .. ' ' .. key .. #payload .. ' ' .. payload
  else
    message[i] = 'S' .. #key .. ' ' .. key
  end
end
if px == 0 then redis.call('MSET', unpack(set)) end
redis.call('ZADD', KEYS[2], unpack(index))
redis.call('SPUBLISH', ARGV[2],
  'SM1 ' .. epoch .. ' ' .. string.format('%d', first) .. ' B ' .. table.concat(message))
if px > 0 then return {epoch, last, px} end
return {epoch, last, -1}
