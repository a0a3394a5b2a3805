-- map_get: read one SyncMap entry together with the map's epoch and seq (the read's version).
-- KEYS[1] meta hash {epoch, seq}   KEYS[2] the entry's record
-- Returns, when a record is there: epoch .. " " .. seq .. " " .. pttl .. "\n" .. record (a
-- string: a table answer costs the server ~1 µs more, converted field by field and then
-- garbage for the Lua collector; epoch "" when the meta is missing); else
-- {epoch or false, seq, false, -2, foreign}
--   pttl: the record's remaining life in ms (-1: none; -2: absent)
--   foreign: 1 when something that is not a string sits under the record key
-- Parsed by syncmap._core.replies.GetReply.
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local record = redis.pcall('GET', KEYS[2])  -- an error: not a string (no TYPE call needed)
if not record or type(record) == 'table' then
  return {m[1], tonumber(m[2] or '0'), false, -2, record and 1 or 0}
end
local pttl = string.format('%d', redis.call('PTTL', KEYS[2]))
return (m[1] or '') .. ' ' .. (m[2] or '0') .. ' ' .. pttl .. '\n' .. record
