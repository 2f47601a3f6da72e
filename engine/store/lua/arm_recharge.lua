-- arm_recharge.lua: set an account's threshold auto-recharge flags (PUT /auto-recharge)
-- and apply the minimum-balance rule to its balance in the same step. Moves no money.
--
-- decide.lua pauses an account (reason min_balance) when a debit takes it below its
-- minimum balance *without* auto-recharge, and only on that crossing. So the rule is also
-- applied here, when the flag changes, as a config reload applies it (account_settings.lua):
-- turned on, a min_balance pause no longer applies and is lifted if the balance is at
-- least 0, as a credit lifts it (buyer_resumed; the recharge the caller asks for next
-- refills the account); turned off while below the minimum, an active account is paused
-- (buyer_paused), as a debit would pause it. Other pauses are left alone.

-- KEYS[1]  tenant key prefix
-- ARGV[1]  account id
-- ARGV[2]  auto-recharge threshold, integer micros ("0" = none)
-- ARGV[3]  "1" = threshold auto-recharge on, "0" = off
-- ARGV[4]  now, epoch milliseconds
--
-- All or nothing (atomically, _lib.lua): the flags and the pause or resume they imply.
--
-- Returns JSON {"ok": bool, "events": [type, count, ...]}; ok false: no such account.

local p, now = KEYS[1], ARGV[4]
return atomically(p, function()
  local a = acct(p, ARGV[1])
  if not a then return cjson.encode({ok = false, events = {}}) end
  local old = redis.call('HMGET', a.k, 'rthr', 'ar')
  redis.call('HSET', a.k, 'rthr', ARGV[2], 'ar', ARGV[3])
  note3('h', a.k, 'rthr', old[1])
  note3('h', a.k, 'ar', old[2])
  a.ar = ARGV[3] == '1'
  if a.minb and a.mode ~= 'none' and not a.closed then
    if a.ar and a.paused == 'min_balance' and a.bal >= 0 then
      resume(p, a, now)
    elseif not a.ar and a.paused == '' and a.bal < a.minb then
      pause(p, a, 'min_balance', now, {'ref', 'auto_recharge'})
    end
  end
  return cjson.encode({ok = true, events = emitted_list()})
end)
