-- refund.lua: undo or re-price one sale (a lead sold to one buyer), idempotently.
-- Used by the delivery worker (buyer rejected / said duplicate, or a real-time price) and
-- by returns. A refund credits the buyer's price and the outbound fee back, frees the cap
-- slot (when still in the same windows) and forgets the sale's dedupe fingerprints (the
-- lead's campaign-scope ones too when no other sale of the lead stands).
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  lead id
-- ARGV[2]  buyer id
-- ARGV[3]  action: "refund" | "reprice"
-- ARGV[4]  reprice: the new price in micros (ignored for refunds)
-- ARGV[5]  reason (short text, goes into the ledger entry)
-- ARGV[6]  now, epoch milliseconds
-- ARGV[7]  ledger kind for refunds: "refund" (delivery rejected) or "return" (buyer return)
-- ARGV[8]  tenant wallet account id
-- ARGV[9]  optional: who asked (a buyer key's "<user>/key:<id>"), the ledger entries' user
--
-- A return (kind "return") emits lead_returned on the buyer's account: lead_id, buyer,
-- amount (the price credited back), reason (ARGV[5]); once per sale (a replay emits
-- nothing).
--
-- All or nothing (atomically, _lib.lua): a refund that fails half-way (a key of the wrong
-- type) leaves nothing, so the caller's retry cannot credit twice.
--
-- Returns JSON {"ok":true,"state":"refunded"|"sold","price":"<micros>","replay":bool,
-- "events":[type, count, ...] emitted by this call (for metrics; absent on a replay)}
--           or {"ok":false,"error":"unknown_sale"}

local p, lead_id, b, action = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local now, reason, kind = ARGV[6], ARGV[5], ARGV[7]
local lk = K.lead(p, lead_id)
local raw = redis.call('HGET', lk, b)
if not raw then return cjson.encode({ok = false, error = 'unknown_sale'}) end
local sale = cjson.decode(raw)
local price = tonumber(sale.p)

if sale.s == 'refunded' then
  return cjson.encode({ok = true, state = 'refunded', price = sale.p, replay = true})
end

return atomically(p, function()
  local a = acct(p, sale.a)
  local extra = {'buyer', b, 'reason', reason}
  if ARGV[9] and ARGV[9] ~= '' then
    extra[#extra + 1] = 'user'
    extra[#extra + 1] = ARGV[9]
  end

  -- spend counters follow the sale's price while the sale's day/month are the current ones
  local function spend(delta)
    local bk = K.buyer(p, b)
    local v = redis.call('HMGET', bk, 'sdid', 'smid')
    if v[1] == sale.w[2] then redis.call('HINCRBY', bk, 'sdv', fmt(delta)); note3('n', bk, 'sdv', delta) end
    if v[2] == sale.w[4] then redis.call('HINCRBY', bk, 'smv', fmt(delta)); note3('n', bk, 'smv', delta) end
  end

  if action == 'reprice' then
    local new = tonumber(ARGV[4])
    if new == price or sale.rp then
      return cjson.encode({ok = true, state = 'sold', price = sale.p, replay = sale.rp == true})
    end
    -- a higher real-time price is a further debit: it may not take the balance below the
    -- floor (the sale then stands at its routed price)
    if new > price and a.mode ~= 'none' and a.bal - a.held - (new - price) < a.floor then
      new = price
    end
    if new ~= price then
      apply(p, a, price - new, 'reprice', lead_id, now, extra)
      spend(new - price)
    end
    sale.p, sale.rp = fmt(new), true
    redis.call('HSET', lk, b, cjson.encode(sale))
    note3('h', lk, b, raw)
    return cjson.encode({ok = true, state = 'sold', price = sale.p, replay = false,
                         events = emitted_list()})
  end

  apply(p, a, price, kind, lead_id, now, extra)
  if kind == 'return' then
    emit(p, 'lead_returned', a, now, {'lead_id', lead_id, 'buyer', b, 'amount', sale.p,
                                      'reason', reason})
  end
  local fee = tonumber(sale.f)
  if fee > 0 then
    local wallet = acct(p, ARGV[8])
    if wallet then apply(p, wallet, fee, 'fee_refund', lead_id, now, extra) end
  end

  -- free the cap slot when the sale's windows are still the current ones
  local bk = K.buyer(p, b)
  local v = redis.call('HMGET', bk, 'hid', 'did', 'wid', 'mid')
  local w = sale.w
  local pairs_ = {{v[1], w[1], 'hn'}, {v[2], w[2], 'dn'}, {v[3], w[3], 'wn'}, {v[4], w[4], 'mn'}}
  for _, t in ipairs(pairs_) do
    if t[1] == t[2] then redis.call('HINCRBY', bk, t[3], -1); note3('n', bk, t[3], -1) end
  end
  local tn = redis.call('HGET', bk, 'tn')  -- 'n' would leave a field (or hash) it created
  redis.call('HINCRBY', bk, 'tn', -1)
  note3('h', bk, 'tn', tn)
  spend(-price)

  -- only sold leads count as duplicates: forget the fingerprints this sale set (buyer scope),
  -- and the lead's campaign-scope ones once no sale of it stands (send_to_all: others may)
  local function forget(fps)
    for _, fp in ipairs(fps or {}) do
      local dk = K.dup(p, fp)
      if redis.call('GET', dk) == lead_id then
        local ttl = redis.call('PTTL', dk)
        redis.call('DEL', dk)
        note3('r', dk, lead_id, ttl)
      end
    end
  end
  forget(sale.bd)

  sale.s = 'refunded'
  redis.call('HSET', lk, b, cjson.encode(sale))
  note3('h', lk, b, raw)
  local standing = false
  for _, v in ipairs(redis.call('HVALS', lk)) do
    local ok, other = pcall(cjson.decode, v)
    if ok and type(other) == 'table' and other.s == 'sold' then standing = true; break end
  end
  if not standing then forget(sale.cd) end
  return cjson.encode({ok = true, state = 'refunded', price = sale.p, replay = false,
                       events = emitted_list()})
end)
