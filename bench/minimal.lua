-- minimal.lua: the design's floor for deciding a sold lead, the yardstick of decide.lua
-- (`python -m bench lua`, issue #16's `decide_vs_minimal`). Never loaded by the engine.
--
-- It takes decide.lua's own KEYS and ARGV (the same calls: KEYS[1] the tenant prefix,
-- ARGV[1] the call JSON with its candidate table, ARGV[1 + i] lead i's payload when not
-- inline), decodes them the same way (cjson), and sells each lead to its first candidate
-- with only a sold lead's essential writes. Per sold lead it writes, and nothing else:
--
--   1. SET  idem:<key> <lead id> NX EX <kt>       the idempotency record (NX: a replay
--                                                 finds it and nothing else is written)
--   2. SET  dup:<fp> <lead id> NX EX <dt>         one per campaign dedupe fingerprint
--                                                 (two for the solar campaign: email, phone)
--   3. HINCRBY acct:<a> bal -<price>              the buyer's balance, with its floor check
--                                                 (the floor read once per account per
--                                                 call; below it: HINCRBY back, REJECTED)
--   4. XADD sales * ...                           ONE entry that is at once the ledger entry
--                                                 (account, price = -delta, balance) and the
--                                                 delivery job (buyer, price, payload)
--
-- Per call: one HGET of each account's floor. No cap counters, no platform fees, no sale
-- record, no events, no undo journal, no round robin: what decide.lua does beyond these is
-- what `decide_vs_minimal` prices.

local p = KEYS[1]
local batch = cjson.decode(ARGV[1])
local CANDS = batch.c or {}
local now = string.format('%d', batch.now)
local FLOORS = {}
local out = {}

local function fmt(n) return string.format('%d', n) end
local TEXT = {}  -- TTLs as text, once per distinct value (redis.call formats a number
local function text(n)  -- with a float printf each time)
  local t = TEXT[n]
  if not t then t = fmt(n); TEXT[n] = t end
  return t
end

local function floor_of(k)
  local f = FLOORS[k]
  if f == nil then
    f = tonumber(redis.call('HGET', k, 'floor') or '') or -20000000
    FLOORS[k] = f
  end
  return f
end

for i, L in ipairs(batch.leads) do
  local x = L.x or ARGV[i + 1]
  local r
  if not redis.call('SET', p .. 'idem:' .. L.k, L.id, 'NX', 'EX', text(L.kt)) then
    r = {id = L.id, s = 'DUPLICATED', c = 102, rp = true}
  else
    local dup = false
    for j = 1, #L.d do
      if not redis.call('SET', p .. 'dup:' .. L.d[j], L.id, 'NX', 'EX', text(L.dt)) then dup = true end
    end
    local c = L.cs[1]
    if type(c) == 'string' then c = CANDS[c] end
    if dup then
      r = {id = L.id, s = 'DUPLICATED', c = 100}
    elseif not c then
      r = {id = L.id, s = 'REJECTED', c = 200}
    else
      local k = p .. 'acct:' .. c.a
      local price = fmt(c.p)
      local bal = redis.call('HINCRBY', k, 'bal', '-' .. price)
      if bal < floor_of(k) then
        redis.call('HINCRBY', k, 'bal', price)
        r = {id = L.id, s = 'REJECTED', c = 202}
      else
        redis.call('XADD', p .. 'sales', '*', 'lead_id', L.id, 'buyer', c.b, 'account', c.a,
                   'price', price, 'balance', fmt(bal), 'campaign', L.c, 'lead', x,
                   'ts', now)
        r = {id = L.id, s = 'ACCEPTED', c = 0, sold = {{c.b, price}}}
      end
    end
  end
  out[i] = r
end
return cjson.encode({r = out})
