-- sync_account.lua: create an account from config, or update its settings on reload.
-- The balance of an existing account is never touched here; a new account's opening
-- balance is written as an "opening" ledger entry so the ledger always sums to it.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  account id
-- ARGV[2]  opening balance, micros (used only when the account is created)
-- ARGV[3]  floor, micros (e.g. -20000000)
-- ARGV[4]  balance alert threshold, micros (0 = none)
-- ARGV[5]  auto-recharge threshold, micros (0 = none)
-- ARGV[6]  auto-recharge enabled, "1" or "0"
-- ARGV[7]  minimum balance, micros, or "" for none
-- ARGV[8]  billing mode: none | manual | realtime
-- ARGV[9]  now, epoch milliseconds
--
-- Returns 1 when the account was created, 0 when updated.

local p, id = KEYS[1], ARGV[1]
local k = K.acct(p, id)
local created = 0
if redis.call('EXISTS', k) == 0 then
  redis.call('HSET', k, 'bal', '0', 'paused', '', 'closed', '0')
  redis.call('SADD', K.accounts(p), id)
  created = 1
end
redis.call('HSET', k, 'floor', ARGV[3], 'alert', ARGV[4], 'rthr', ARGV[5], 'ar', ARGV[6],
           'minb', ARGV[7], 'mode', ARGV[8])
if created == 1 and tonumber(ARGV[2]) ~= 0 then
  local a = acct(p, id)
  apply(p, a, tonumber(ARGV[2]), 'opening', 'opening:' .. id, ARGV[9], {})
end
return created
