-- map_unload: give up get_or_load's load lock of one entry (the loader failed), if still ours.
-- KEYS[1] the entry's load lock   ARGV[1] load token
-- Returns 1 if released, 0 if it was not ours (expired or taken over).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
