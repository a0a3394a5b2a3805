-- map_get: read one SyncMap entry together with the map's epoch and seq (the read's version).
-- KEYS[1] meta hash {epoch, seq}   KEYS[2] the entry's record
-- Returns {epoch or false, seq, record or false, pttl, foreign}
--   pttl: the record's remaining life in ms (-1: none, -2: absent)
--   foreign: 1 when something that is not a string sits under the record key (record is false)
-- Parsed by syncmap._core.replies.GetReply.
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local t = redis.call('TYPE', KEYS[2])['ok']
if t == 'none' then
  return {m[1], tonumber(m[2] or '0'), false, -2, 0}
elseif t ~= 'string' then
  return {m[1], tonumber(m[2] or '0'), false, -2, 1}
end
return {m[1], tonumber(m[2] or '0'), redis.call('GET', KEYS[2]), redis.call('PTTL', KEYS[2]), 0}
