-- map_load: get_or_load's single flight. If the entry exists, read it (as map_get); otherwise
-- try to take the entry's load lock.
-- KEYS[1] meta hash {epoch, seq}   KEYS[2] the entry's record   KEYS[3] the entry's load lock
-- ARGV[1] load token   ARGV[2] load lock life in ms
-- Returns {state, epoch or false, seq, record or false, pttl, foreign}
--   state: 1 the entry exists (record, pttl as map_get); 2 lock taken by us: run the loader;
--          0 another node is loading (pttl: the load lock's remaining life)
-- Parsed by syncmap._core.replies.LoadReply (state: LoadState).
local m = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local seq = tonumber(m[2] or '0')
local record = redis.pcall('GET', KEYS[2])  -- an error: not a string (no TYPE call needed)
if type(record) == 'table' then
  return {1, m[1], seq, false, -2, 1}
elseif record then
  return {1, m[1], seq, record, redis.call('PTTL', KEYS[2]), 0}
end
-- (ours already: a resent call whose first answer was lost; idempotent)
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) or redis.call('GET', KEYS[3]) == ARGV[1] then
  return {2, m[1], seq, false, -2, 0}
end
return {0, m[1], seq, false, redis.call('PTTL', KEYS[3]), 0}
