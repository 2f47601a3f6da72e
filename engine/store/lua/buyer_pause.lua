-- buyer_pause.lua: pause or resume one buyer by hand (POST /v1/buyers/{id}/pause, /resume).
-- Moves no money. The flag and its event are one step, so each pause emits exactly one
-- buyer_paused and each resume one buyer_resumed, however many requests race.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  buyer id
-- ARGV[2]  the buyer's client account id (the event's account and balance, as decide.lua's)
-- ARGV[3]  "1" = pause, "0" = resume
-- ARGV[4]  now, epoch milliseconds
--
-- All or nothing (atomically, _lib.lua): the flag and its event.
--
-- Returns JSON {"changed": bool, "events": [type, count, ...]}: pausing a buyer already
-- paused by hand, or resuming one that is not, changes nothing and emits nothing.

local p, b, now = KEYS[1], ARGV[1], ARGV[4]
local k = K.buyer(p, b)
local stored = redis.call('HGET', k, 'paused')
local was = stored or ''
local pausing = ARGV[3] == '1'
if (was ~= '') == pausing then
  return cjson.encode({changed = false, events = {}})
end
return atomically(p, function()
  local a = acct(p, ARGV[2]) or {id = ARGV[2], bal = 0}
  if pausing then
    redis.call('HSET', k, 'paused', 'manual')
    note3('h', k, 'paused', stored)
    paused_event(p, a, 'manual', now, {'buyer', b})
  else
    redis.call('HSET', k, 'paused', '')
    note3('h', k, 'paused', stored)
    emit(p, 'buyer_resumed', a, now, {'buyer', b, 'reason', was})
  end
  return cjson.encode({changed = true, events = emitted_list()})
end)
