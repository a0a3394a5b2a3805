-- map_write: one change of one SyncMap entry, atomically: guard check, epoch, seq, record, index,
-- change message. Record = "SM\1" .. epoch .. " " .. seq .. "\n" .. payload.
-- Change message (on the channel) = "SM1 " .. epoch .. " " .. seq .. " " .. op .. " " .. key, op S or D;
-- or, for a write with no expiry whose payload is at most the push limit, the value too:
-- "SM1 " .. epoch .. " " .. seq .. " V " .. #key .. " " .. key .. payload.
--
-- KEYS[1] meta hash {epoch, seq}     KEYS[2] the entry's record     KEYS[3] idx zset
-- KEYS[4] fences hash                KEYS[5] the entry's load lock  KEYS[6] guard lock
-- (KEYS[4..5] only for a guarded write or one with a load token; KEYS[6] only when guarded)
-- ARGV[1] op: set | setnx | del | cas | casv | incr | incrx | touch
--   incrx: incr of an existing entry only (absent: condition false);
--   touch: rewrite an existing entry's payload with a new expiry (px 0: none)
-- ARGV[2] entry key (for the change message and idx)
-- ARGV[3] epoch candidate: becomes the epoch only if meta is missing (fresh random per call)
-- ARGV[4] channel
-- ARGV[5] payload (set, setnx, cas, casv) or increment (incr)
-- ARGV[6] px: expiry in ms, 0 = none (incr keeps an existing entry's expiry)
-- ARGV[7] push: whether the value rides in the change message.
--   set, setnx, cas, casv (the writer sent the payload: it decides, as the push limit says): the
--   key's length in bytes as text when it rides, "" when it does not (the script converts no
--   number for it); incr, incrx, touch (the script makes the payload): the push limit, payloads
--   up to this many bytes ride (0 = never). Either way, a record with an expiry never carries.
-- The rest may be left out (a plain set sends none of them: fewer arguments, less garbage):
-- ARGV[8] cas: expected payload; casv: expected "epoch seq" of the record ("" = absent);
--         incr, incrx: codec name (json | msgpack)
-- ARGV[9] guard token ("" or none = unguarded)   ARGV[10] guard fence ("" or none = none)
-- ARGV[11] load token: release the entry's load lock if it holds this token ("" or none)
-- Returns, for a set or setnx that wrote: the new record's version "epoch seq" (a string; its
-- pttl is px, or -1 for none: time stands still inside a script); for a del that wrote:
-- "epoch seq" .. "\n" .. the record it removed ("" for foreign data). Strings, not tables: a
-- table answer costs the server ~1 µs more (converted field by field, then garbage for the
-- Lua collector). Anything else returns {epoch or false, seq, status, record or false, pttl}
--   seq: the write's seq when written, else the map's current seq (version of what was read)
--   status: 1 written; 0 condition false (nothing written); -1 guard rejected;
--           -2 incr on a value that is not an integer; -3 foreign data under the record key
--   record: del/setnx/cas/casv: the record before the call; incr/incrx/touch: the new record
--   pttl: the record's remaining life in ms after the call (-1: none, -2: absent)
-- Parsed by syncmap._core.replies.WriteReply (status: WriteStatus).
local meta, rec, idx = KEYS[1], KEYS[2], KEYS[3]
local op, key, channel = ARGV[1], ARGV[2], ARGV[4]
local expected, guard, fence, load = ARGV[8] or '', ARGV[9] or '', ARGV[10] or '', ARGV[11] or ''
-- Straight-line code, no closures or helper functions: this script runs on every write, and
-- every object it makes is garbage that the server's Lua collector sweeps (a step of it runs
-- in every 50th script call, and delays that call's reply and change message).

-- The checks run in a block left by `break` (Lua 5.1 has no goto) with `refused` set to the
-- status of a refusal; `before` is then the record to return with it.
local refused = nil
local before, old_version, old_payload = false, '', nil
local existed = false
local payload, keepttl = ARGV[5], false
repeat
  -- guard: the lock key must hold our token, and our fence must not be older than one seen
  if guard ~= '' then
    local holder = redis.call('GET', KEYS[6])
    if not holder or string.sub(holder, 1, #guard) ~= guard then
      refused = -1
      break
    end
    if fence ~= '' then
      local seen = redis.call('HGET', KEYS[4], KEYS[6])
      if seen and tonumber(fence) < tonumber(seen) then
        refused = -1
        break
      end
    end
  end
  -- a plain set needs neither the current record nor its type: it overwrites whatever is there
  if op == 'set' then break end

  -- the current record: before = the record or false; old_version = "epoch seq"; old_payload
  local got = redis.pcall('GET', rec)  -- false: absent; an error (a table): not a string
  if type(got) == 'string' then
    before = got
    local nl = string.find(before, '\n', 4, true)
    if string.sub(before, 1, 3) ~= 'SM\1' or not nl then  -- foreign data: only del goes on
      before = false
      if op ~= 'del' then
        refused = -3
        break
      end
    else
      old_version = string.sub(before, 4, nl - 1)
      old_payload = string.sub(before, nl + 1)
    end
    existed = true
  elseif got then  -- foreign data of another type: only del goes on
    if op ~= 'del' then
      refused = -3
      break
    end
    existed = true
  end

  -- the decision: what to write (payload), or a refusal
  if op == 'setnx' then
    if existed then refused = 0 end
  elseif op == 'cas' then
    if old_payload ~= expected then refused = 0 end
  elseif op == 'casv' then
    if old_version ~= expected then refused = 0 end
  elseif op == 'incr' or op == 'incrx' then
    if op == 'incrx' and not existed then
      refused = 0
      break
    end
    local n = 0
    if old_payload then
      if expected == 'msgpack' then
        local ok, v = pcall(cmsgpack.unpack, old_payload)
        if not ok or type(v) ~= 'number' or v ~= math.floor(v) then
          refused = -2
          break
        end
        n = v
      else
        if not string.match(old_payload, '^%-?%d+$') then
          refused = -2
          break
        end
        n = tonumber(old_payload)
      end
    end
    n = n + tonumber(ARGV[5])
    if math.abs(n) > 9007199254740991 then
      refused = -2
      break
    end
    if expected == 'msgpack' then payload = cmsgpack.pack(n) else payload = string.format('%d', n) end
    keepttl = existed
  elseif op == 'del' then
    if not existed then refused = 0 end
  elseif op == 'touch' then
    if existed then payload = old_payload else refused = 0 end
  else
    return redis.error_reply('map_write: unknown op ' .. tostring(op))
  end
until true

if refused then  -- nothing written: the map's version, and the record as it is
  local m = redis.call('HMGET', meta, 'epoch', 'seq')
  return {m[1], tonumber(m[2] or '0'), refused, before, redis.call('PTTL', rec)}
end

local push = ARGV[7] or ''  -- from here: the key's length when the value rides, else ''
if op == 'incr' or op == 'incrx' or op == 'touch' then
  local limit = tonumber(push) or 0
  if limit > 0 and #payload <= limit then push = string.format('%d', #key) else push = '' end
end

-- commit: bump the map's seq (creating the epoch if the map's meta is gone), bookkeeping
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
local version = epoch .. ' ' .. string.format('%d', seq)  -- in the record, message and reply
if guard ~= '' and fence ~= '' then
  local seen = redis.call('HGET', KEYS[4], KEYS[6])
  if not seen or tonumber(fence) > tonumber(seen) then
    redis.call('HSET', KEYS[4], KEYS[6], fence)
  end
end
if load ~= '' and redis.call('GET', KEYS[5]) == load then
  redis.call('DEL', KEYS[5])
end

if op == 'del' then
  redis.call('DEL', rec)
  redis.call('ZREM', idx, key)
  redis.call('SPUBLISH', channel, 'SM1 ' .. version .. ' D ' .. key)
  return version .. '\n' .. (before or '')
end

local record = 'SM\1' .. version .. '\n' .. payload
local px, pttl = tonumber(ARGV[6]), -1
if keepttl then
  redis.call('SET', rec, record, 'KEEPTTL')
  pttl = redis.call('PTTL', rec)
elseif px > 0 then
  redis.call('SET', rec, record, 'PX', px)
  pttl = px  -- time stands still inside a script
else
  redis.call('SET', rec, record)
end
if pttl > 0 then
  local now = redis.call('TIME')
  redis.call('ZADD', idx, tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + pttl, key)
else
  redis.call('ZADD', idx, '+inf', key)
end
if pttl < 0 and push ~= '' then
  redis.call('SPUBLISH', channel, 'SM1 ' .. version .. ' V ' .. push .. ' ' .. key .. payload)
else
  redis.call('SPUBLISH', channel, 'SM1 ' .. version .. ' S ' .. key)
end
-- record: the one before for cas/casv, the new one for incr, else false
if op == 'incr' or op == 'incrx' or op == 'touch' then return {epoch, seq, 1, record, pttl} end
if op == 'cas' or op == 'casv' then return {epoch, seq, 1, before, pttl} end
-- set, setnx: the version alone
return version
