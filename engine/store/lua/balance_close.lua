-- balance_close.lua: close an account for a refund of its balance, in one step with the
-- check that its card charges can refund that balance (billing.funding.refund_balance).
-- Checked and closed atomically: a credit landing between a separate check and the close
-- would be closed in uncovered, and the refund would return only part of the balance.
-- Moves no money: the refunds are ledger entries written afterwards through adjust.lua.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  account id
-- ARGV[2]  micros the account's card charges can still refund
-- ARGV[3]  the smallest unit a card refunds, micros (a cent: 10000); the sub-unit rest
--          of the balance is written off, not refunded
--
-- Returns {status, balance micros}: status "ok" (the account is now closed; the balance
-- is what the refund returns), or "unknown_account", "negative_balance",
-- "refund_exceeds_charges" (nothing changed).

local k = K.acct(KEYS[1], ARGV[1])
local bal = redis.call('HGET', k, 'bal')
if not bal then return {'unknown_account', '0'} end
local b, unit = tonumber(bal), tonumber(ARGV[3])
if b < 0 then return {'negative_balance', bal} end
if b - b % unit > tonumber(ARGV[2]) then return {'refund_exceeds_charges', bal} end
redis.call('HSET', k, 'closed', '1')
return {'ok', bal}
