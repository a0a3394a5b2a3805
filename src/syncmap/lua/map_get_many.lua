-- map_get_many: read a batch of SyncMap entries together with the map's epoch and seq (the
-- version of every read).
-- KEYS[1] meta hash {epoch, seq}   KEYS[1 + i] the record of entry i
-- Returns {epoch or false, seq, records, pttls, foreign}, one item per entry in each list:
--   records: the record, or false (absent, or not a string)
--   pttls: the record's remaining life in ms (-1: none, -2: absent)
--   foreign: 1 when something that is not a string sits under the record key, else 0
-- Parsed by syncmap._core.replies.GetManyReply.
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local records = redis.call('MGET', unpack(KEYS, 2))  -- false for a key that is not a string
local pttls, foreign = {}, {}
for i = 1, #KEYS - 1 do
  if records[i] then
    pttls[i] = redis.call('PTTL', KEYS[i + 1])
    foreign[i] = 0
  else
    pttls[i] = -2
    -- absent, or not a string: GET errs on the latter (as map_get; cheaper than TYPE, whose
    -- status answer is a table for the Lua collector)
    foreign[i] = type(redis.pcall('GET', KEYS[i + 1])) == 'table' and 1 or 0
  end
end
return {m[1], tonumber(m[2] or '0'), records, pttls, foreign}
