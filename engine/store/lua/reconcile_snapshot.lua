-- reconcile_snapshot.lua: a tenant in one step, for `leadflow reconcile` (engine/run/reconcile.py):
-- its ledger stream's last id and its accounts' balances, read together, so the ledgers
-- are summed up to that id only and a sale made meanwhile is in neither. Read-only.
--
-- KEYS[1]   the tenant's ledger stream (keys.ledger)
-- KEYS[2..] account hashes of the tenant (keys.acct), in the caller's order
-- ARGV      none
--
-- Returns {the last id ever written to the ledger stream ("0-0" when it has none;
-- last-generated-id, not the last entry: the archive may have trimmed the stream empty),
-- then HMGET bal, floor, mode, held of each account hash of KEYS[2..]}.

local last = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local out = {last}
for i = 2, #KEYS do out[i] = redis.call('HMGET', KEYS[i], 'bal', 'floor', 'mode', 'held') end
return out
