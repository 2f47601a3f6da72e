-- alert_set.lua: an account's own balance alert threshold (PUT /v1/accounts/{id}/alert), or
-- the config's back in force, applied to the account's balance in the same step. Moves no
-- money.
--
-- The own threshold is kept in the account's field ualert beside the one in force (alert):
-- account_settings.lua (a reload, a restart) keeps it over the config's. The change is
-- applied as a reload applies a new threshold (_lib.lua alert_crossed): balance_alert
-- (ref ARGV[5]) when the new threshold lies above the balance and the old one did not.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  account id
-- ARGV[2]  the account's own threshold, integer micros; "" = none (the config's in force)
-- ARGV[3]  the config's threshold, integer micros (0 = none), in force when ARGV[2] is ""
-- ARGV[4]  now, epoch milliseconds
-- ARGV[5]  the event's ref
--
-- All or nothing (atomically, _lib.lua): the fields and the event.
--
-- Returns JSON {"ok": bool, "events": [type, count, ...]}; ok false: no such account.

local p, now = KEYS[1], ARGV[4]
return atomically(p, function()
  local a = acct(p, ARGV[1])
  if not a then return cjson.encode({ok = false, events = {}}) end
  local was_below = below_alert(a)
  local old = redis.call('HMGET', a.k, 'alert', 'ualert')
  local alert = ARGV[3]
  if ARGV[2] ~= '' then
    alert = ARGV[2]
    redis.call('HSET', a.k, 'ualert', ARGV[2])
  else
    redis.call('HDEL', a.k, 'ualert')
  end
  note3('h', a.k, 'ualert', old[2])
  redis.call('HSET', a.k, 'alert', alert)
  note3('h', a.k, 'alert', old[1])
  a.alert = tonumber(alert)
  alert_crossed(p, a, was_below, now, ARGV[5])
  return cjson.encode({ok = true, events = emitted_list()})
end)
