-- map_version: the map's epoch and the header of one entry's record, without its value
-- (fresh reads: one small round trip instead of re-transferring the value).
-- KEYS[1] meta hash {epoch, seq}   KEYS[2] the entry's record
-- Returns {epoch or false, seq, head or false, foreign}
--   head: the record's first 64 bytes ("SM\1" .. epoch .. " " .. seq .. "\n" ...), false if absent
--   foreign: 1 when something that is not a string sits under the record key
-- Parsed by syncmap._core.replies.VersionReply.
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
-- an error: not a string; "": absent (a record is never empty); no TYPE call needed
local head = redis.pcall('GETRANGE', KEYS[2], 0, 63)
if type(head) == 'table' then
  return {m[1], tonumber(m[2] or '0'), false, 1}
elseif head == '' then
  return {m[1], tonumber(m[2] or '0'), false, 0}
end
return {m[1], tonumber(m[2] or '0'), head, 0}
