-- adjust.lua: one idempotent balance change (manual credit, funding, recharge, usage, refund).
--
-- KEYS[1]  tenant key prefix ("lf:{tenant}:"); every key touched derives from it (one slot)
-- ARGV[1]  account id
-- ARGV[2]  delta, integer micros, signed (negative = debit)
-- ARGV[3]  ledger kind (funding, recharge, usage, refund, adjustment, ...)
-- ARGV[4]  operation id: the idempotency key ("" = not idempotent); also the ledger `ref`
-- ARGV[5]  seconds to remember the operation id (e.g. 32 days for usage events)
-- ARGV[6]  now, epoch milliseconds
-- ARGV[7]  "1" = refuse a debit that would take the available balance (balance less open
--          ping-post holds) below the floor (or hit a closed/paused account)
-- ARGV[8]  extra ledger fields, JSON array [k1, v1, k2, v2, ...] (strings)
-- ARGV[9]  optional; "1" = refuse a closed account whatever the direction (a manual credit:
--          an account closed by refund-balance stays closed; checked here, in the same step
--          as the credit, so a close racing it cannot let it through)
-- ARGV[10] optional; JSON array [type, k1, v1, ...]: an event this change completes, emitted
--          in its step (refund_processed with the last booking of a balance refund); "" none
--
-- Events: the apply() crossings (_lib.lua), and funding_received for a credit of kind
-- "funding" (POST /funds by card, a manual credit, the operator's wallet credit):
-- amount, method ("card" when the credit carries the card's payment_method, else
-- "manual"), ref (the op id). A replay emits nothing.
--
-- Returns JSON: {"ok":true,"balance":"<micros>","entry":"<ledger id>","replay":false,
--                "delta":"<micros>"}   (the op's delta, so a caller can tell a replay of
--                                       the same key with another amount)
--           or  {"ok":false,"error":"unknown_account"|"below_floor"|"closed"|"balance_limit",
--                "events": [...]}  (a refusal's events: only 'hold:expired' counts)
--
-- All or nothing (atomically, _lib.lua): a failure after the balance change (the op id's
-- SET) takes it back, so a retry under the same op id cannot move money twice.
--
-- A balance never leaves +-1e15 micros (billing.money.MAX_ABS_MICROS): Lua numbers are
-- doubles, exact for integers only below 2^53, and HINCRBY fails past 2^63.

local p = KEYS[1]
local id, delta, kind, opid = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local now, enforce = ARGV[6], ARGV[7] == '1'
clock(now)  -- expired ping-post holds are released as the account is read

if opid ~= '' then
  local prior = redis.call('GET', K.op(p, opid))
  if prior then
    local r = cjson.decode(prior)
    r.replay = true
    return cjson.encode(r)
  end
end

-- a refusal moves no money, but reading the account may have released expired holds
-- (counted in its events, 'hold:expired')
local function refuse(why)
  return cjson.encode({ok = false, error = why, events = emitted_list()})
end

return atomically(p, function()
  local a = acct(p, id)
  if not a then return refuse('unknown_account') end
  if a.closed and ARGV[9] == '1' then return refuse('closed') end
  if math.abs(a.bal + delta) > 1e15 then return refuse('balance_limit') end
  if delta < 0 and enforce and a.mode ~= 'none' then
    if a.closed then return refuse('closed') end
    if a.bal - a.held + delta < a.floor then return refuse('below_floor') end
  end

  local extra = cjson.decode(ARGV[8])
  local entry = apply(p, a, delta, kind, opid, now, extra)
  if kind == 'funding' and delta > 0 then
    local method = 'manual'
    for i = 1, #extra, 2 do
      if extra[i] == 'payment_method' then method = 'card'; break end
    end
    emit(p, 'funding_received', a, now, {'amount', fmt(delta), 'method', method, 'ref', opid})
  end
  if ARGV[10] and ARGV[10] ~= '' then
    local ev = cjson.decode(ARGV[10])
    emit(p, ev[1], a, now, {unpack(ev, 2)})
  end
  local result = cjson.encode({ok = true, balance = fmt(a.bal), entry = entry, replay = false,
                               delta = fmt(delta), events = emitted_list()})
  if opid ~= '' then
    redis.call('SET', K.op(p, opid), result, 'EX', tonumber(ARGV[5]))
  end
  return result
end)
