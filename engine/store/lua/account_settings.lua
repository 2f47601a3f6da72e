-- account_settings.lua: create an account from config, or update its settings on reload, and
-- apply the settings to the account's state at once.
-- The balance of an existing account is never touched here; a new account's opening
-- balance is written as an "opening" ledger entry so the ledger always sums to it.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  account id
-- ARGV[2]  opening balance, micros (used only when the account is created)
-- ARGV[3]  floor, micros (e.g. -20000000)
-- ARGV[4]  balance alert threshold, micros (0 = none): the config's, in force unless the
--          account has its own (field ualert, set by PUT /alert: alert_set.lua), which a
--          reload keeps
-- ARGV[5]  auto-recharge threshold, micros (0 = none)
-- ARGV[6]  auto-recharge enabled, "1" or "0"
-- ARGV[7]  minimum balance, micros, or "" for none
-- ARGV[8]  billing mode: none | manual | realtime
-- ARGV[9]  now, epoch milliseconds
--
-- All or nothing (atomically, _lib.lua): a new account whose opening entry could not be
-- written is not left behind without it (a later call would never write it).
--
-- Returns {1 when the account was created else 0, the events emitted [type, count, ...]}.
--
-- New settings against the unchanged balance, as apply() does for a new balance (events
-- carry ref "config"; nothing for a closed account, nor for billing "none"):
-- * balance_alert / recharge_needed when the (armed) threshold now lies above the balance
--   and the old one did not: once per crossing, like a debit's crossing. A new account
--   starts where its opening balance puts it and crosses nothing.
-- * an active account below its floor pauses ("floor"); below its minimum without
--   auto-recharge, it pauses ("min_balance"), a new account too.
-- * an account paused for "min_balance" resumes once the minimum no longer holds (removed,
--   lowered to its balance, auto-recharge on) and its balance is at least 0, as a credit
--   resumes it. A "floor" pause still waits for a credit (a reload adds no money), any
--   other pause reason is never lifted here; billing "none" is never paused.

local p, id, now = KEYS[1], ARGV[1], ARGV[9]
local k = K.acct(p, id)
return atomically(p, function()
  local created = 0
  local SETTINGS = {'floor', 'alert', 'rthr', 'ar', 'minb', 'mode'}
  if redis.call('EXISTS', k) == 0 then
    redis.call('HSET', k, 'bal', '0', 'paused', '', 'closed', '0')
    note1('k', k)
    if redis.call('SADD', K.accounts(p), id) == 1 then note2('sr', K.accounts(p), id) end
    created = 1
  end

  local function billed(a) return a.mode ~= 'none' end
  local function below_recharge(a)
    return billed(a) and a.ar and a.rthr > 0 and a.bal < a.rthr
  end

  local a = acct(p, id)  -- with the settings in force until now
  local alerted, asked = true, true  -- a new account: no crossing
  if created == 0 then alerted, asked = below_alert(a), below_recharge(a) end
  local old = redis.call('HMGET', k, unpack(SETTINGS))
  local alert = redis.call('HGET', k, 'ualert') or ARGV[4]  -- the account's own wins
  redis.call('HSET', k, 'floor', ARGV[3], 'alert', alert, 'rthr', ARGV[5], 'ar', ARGV[6],
             'minb', ARGV[7], 'mode', ARGV[8])
  for i = 1, #SETTINGS do note3('h', k, SETTINGS[i], old[i]) end
  a.floor, a.alert, a.rthr = tonumber(ARGV[3]), tonumber(alert), tonumber(ARGV[5])
  a.ar, a.minb, a.mode = ARGV[6] == '1', tonumber(ARGV[7]), ARGV[8]
  if created == 1 and tonumber(ARGV[2]) ~= 0 then
    apply(p, a, tonumber(ARGV[2]), 'opening', 'opening:' .. id, now, {})
  end

  if not a.closed then
    local why = {'ref', 'config'}
    alert_crossed(p, a, alerted, now, 'config')
    if below_recharge(a) and not asked then
      emit(p, 'recharge_needed', a, now, {'threshold', fmt(a.rthr), 'ref', 'config'})
    end
    local short = billed(a) and a.minb ~= nil and not a.ar and a.bal < a.minb
    if a.paused == '' then
      if billed(a) and a.bal < a.floor then
        pause(p, a, 'floor', now, why)
      elseif short then
        pause(p, a, 'min_balance', now, why)
      end
    elseif a.paused == 'floor' or a.paused == 'min_balance' then
      if not billed(a) or (a.paused == 'min_balance' and not short and a.bal >= 0) then
        resume(p, a, now)
      end
    end
  end
  return {created, emitted_list()}
end)
