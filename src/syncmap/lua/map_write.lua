-- map_write: one change of one SyncMap entry, atomically: guard check, epoch, seq, record, index,
-- change message. Record = "SM\1" .. epoch .. " " .. seq .. "\n" .. payload.
-- Change message (on the channel) = "SM1 " .. epoch .. " " .. seq .. " " .. op .. " " .. key, op S or D;
-- or, for a write with no expiry whose payload is at most ARGV[11] bytes, the value too:
-- "SM1 " .. epoch .. " " .. seq .. " V " .. #key .. " " .. key .. payload.
--
-- KEYS[1] meta hash {epoch, seq}     KEYS[2] the entry's record     KEYS[3] idx zset
-- KEYS[4] fences hash                KEYS[5] the entry's load lock  KEYS[6] guard lock (if guarded)
-- ARGV[1] op: set | setnx | del | cas | casv | incr
-- ARGV[2] entry key (for the change message and idx)
-- ARGV[3] epoch candidate: becomes the epoch only if meta is missing (fresh random per call)
-- ARGV[4] channel
-- ARGV[5] payload (set, setnx, cas, casv) or increment (incr)
-- ARGV[6] px: expiry in ms, 0 = none (incr keeps an existing entry's expiry)
-- ARGV[7] cas: expected payload; casv: expected "epoch seq" of the record ("" = absent);
--         incr: codec name (json | msgpack)
-- ARGV[8] guard token ("" = unguarded)   ARGV[9] guard fence ("" = none)
-- ARGV[10] load token: release the entry's load lock if it holds this token ("" = none)
-- ARGV[11] push limit: carry payloads up to this many bytes in the change message (0 = never)
-- Returns {epoch or false, seq, status, record or false, pttl}
--   seq: the write's seq when written, else the map's current seq (version of what was read)
--   status: 1 written; 0 condition false (nothing written); -1 guard rejected;
--           -2 incr on a value that is not an integer; -3 foreign data under the record key
--   record: del/setnx/cas/casv: the record before the call; incr: the new record
--   pttl: the record's remaining life in ms after the call (-1: none, -2: absent)
local meta, rec, idx, fences, loadkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op, key, channel = ARGV[1], ARGV[2], ARGV[4]

local function current()
  local m = redis.call('HMGET', meta, 'epoch', 'seq')
  return m[1], tonumber(m[2] or '0')
end

local function answer(status, record)
  local e, s = current()
  return {e, s, status, record, redis.call('PTTL', rec)}
end

-- guard: the lock key must hold our token, and our fence must not be older than one seen
local guard = ARGV[8]
if guard ~= '' then
  local holder = redis.call('GET', KEYS[6])
  if not holder or string.sub(holder, 1, #guard) ~= guard then
    return answer(-1, false)
  end
  if ARGV[9] ~= '' then
    local seen = redis.call('HGET', fences, KEYS[6])
    if seen and tonumber(ARGV[9]) < tonumber(seen) then
      return answer(-1, false)
    end
  end
end

-- the current record: false (absent), or {record, "epoch seq", payload}; foreign data -> nil
local function parse(r)
  if string.sub(r, 1, 3) ~= 'SM\1' then return nil end
  local nl = string.find(r, '\n', 4, true)
  if not nl then return nil end
  return {r, string.sub(r, 4, nl - 1), string.sub(r, nl + 1)}
end

-- (a plain set needs neither the old record nor its type: it overwrites whatever is there)
local old, t = false, 'none'
if op ~= 'set' then
  t = redis.call('TYPE', rec)['ok']
  if t == 'string' then
    old = parse(redis.call('GET', rec))
  elseif t ~= 'none' then
    old = nil
  end
  if old == nil and op ~= 'del' then
    return answer(-3, false)
  end
end

-- bump the map's seq (creating the epoch if the map's meta is gone), bookkeeping; returns
-- epoch, seq and seq as text. The caller publishes the change message.
local function commit()
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = ARGV[3]
    redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  if guard ~= '' and ARGV[9] ~= '' then
    local seen = redis.call('HGET', fences, KEYS[6])
    if not seen or tonumber(ARGV[9]) > tonumber(seen) then
      redis.call('HSET', fences, KEYS[6], ARGV[9])
    end
  end
  if ARGV[10] ~= '' and redis.call('GET', loadkey) == ARGV[10] then
    redis.call('DEL', loadkey)
  end
  return epoch, seq, string.format('%d', seq)
end

local push = tonumber(ARGV[11] or '0') or 0

local function write(payload, px, keepttl)
  local epoch, seq, seqs = commit()
  local head = 'SM1 ' .. epoch .. ' ' .. seqs
  local record = 'SM\1' .. epoch .. ' ' .. seqs .. '\n' .. payload
  local pttl = -1
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
  if pttl < 0 and #payload <= push then
    redis.call('PUBLISH', channel, head .. ' V ' .. #key .. ' ' .. key .. payload)
  else
    redis.call('PUBLISH', channel, head .. ' S ' .. key)
  end
  return {epoch, seq, 1, record, pttl}
end

local px = tonumber(ARGV[6])
local before = old and old[1] or false

if op == 'set' then
  local r = write(ARGV[5], px, false)
  r[4] = false
  return r
elseif op == 'setnx' then
  if old then return answer(0, before) end
  local r = write(ARGV[5], px, false)
  r[4] = false
  return r
elseif op == 'cas' then
  if not old or old[3] ~= ARGV[7] then return answer(0, before) end
  local r = write(ARGV[5], px, false)
  r[4] = before
  return r
elseif op == 'casv' then
  local version = old and old[2] or ''
  if version ~= ARGV[7] then return answer(0, before) end
  local r = write(ARGV[5], px, false)
  r[4] = before
  return r
elseif op == 'incr' then
  local n = 0
  if old then
    local p = old[3]
    if ARGV[7] == 'msgpack' then
      local ok, v = pcall(cmsgpack.unpack, p)
      if not ok or type(v) ~= 'number' or v ~= math.floor(v) then return answer(-2, before) end
      n = v
    else
      if not string.match(p, '^%-?%d+$') then return answer(-2, before) end
      n = tonumber(p)
    end
  end
  n = n + tonumber(ARGV[5])
  if math.abs(n) > 9007199254740991 then return answer(-2, before) end
  local payload
  if ARGV[7] == 'msgpack' then payload = cmsgpack.pack(n) else payload = string.format('%d', n) end
  return write(payload, px, old and true or false)
elseif op == 'del' then
  if t == 'none' then return answer(0, false) end
  redis.call('DEL', rec)
  redis.call('ZREM', idx, key)
  local epoch, seq, seqs = commit()
  redis.call('PUBLISH', channel, 'SM1 ' .. epoch .. ' ' .. seqs .. ' D ' .. key)
  return {epoch, seq, 1, before, -2}
end
return redis.error_reply('map_write: unknown op ' .. tostring(op))
