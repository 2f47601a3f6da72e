-- ping_hold.lua: the bids of one ping, each held on its buyer's client account, and the
-- ping's fees, in one step (docs/pingpost.md). All or nothing (atomically, _lib.lua).
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  JSON {"now": epoch ms, "id": ping id, "ex": expiry (epoch ms), "kt": TTL of the
--          ping hash (s), "w": wallet account id, "fi": inbound_ping fee, "fo": outbound
--          ping fees (micros, every request sent), "c": campaign, "t": 1 = test ping,
--          "k": idempotency key ("" = none), "kt2": its TTL (s), "n": the most bids offered
--          to the seller (1 exclusive, sell_limit shared), "m": the ping's record (JSON text,
--          stored for the post), "xa": expires_at (text, for the answer),
--          "bids": [[buyer, account, bid micros, offered price (decimal text), bid id], ...]
--          in auction order}
--
-- For each bid in order: its hold is placed iff the buyer's account exists and the
-- available balance (balance - held) less the bid stays at or above its floor (can_debit:
-- not closed, not paused; billing mode "none": always); else the bid is dropped. A buyer
-- bids once per ping. No ledger entry for a hold (the balance does not move): the account's
-- `held` grows, its holds ZSET gets "<ping>|<buyer>|<micros>" scored with the expiry, the
-- ping hash h:<buyer>. The ping's fees (fi + fo) are one "ping_fee" ledger entry of the
-- wallet; a wallet that cannot pay them (floor rules) refuses the ping: REJECTED 203,
-- nothing held. A test ping holds nothing and pays nothing (its answer says what would be
-- held now). The ping goes into the tenant's pings ZSET (the sweep).
--
-- The answer is stored in the ping hash ("a") and under the idempotency key, so a replay
-- returns it and changes nothing. Returns JSON {"s": ACCEPTED | REJECTED, "c": code,
-- "m": message, "id": ping id, "bids": [{"bid_id", "price"}], "held": [[buyer, micros]],
-- "xa": expires_at, "rp": true on a replay, "e": events (with "hold:expired": the holds
-- of the bidders' accounts released past their expiry as they were read)}.

local p = KEYS[1]
local q = cjson.decode(ARGV[1])
local now = fmt(q.now)
clock(q.now)

if q.k ~= '' then
  local prior = redis.call('GET', K.idem(p, q.k))
  if prior then
    local r = cjson.decode(prior)
    r.rp = true
    return cjson.encode(r)
  end
end

return atomically(p, function()
  local test = q.t == 1
  local pk = K.ping(p, q.id)
  if redis.call('EXISTS', pk) == 1 then error('ping ' .. q.id .. ' exists') end
  local fees = test and 0 or (q.fi + q.fo)
  local wallet = fees > 0 and acct(p, q.w) or nil
  local r
  if fees > 0 and (not wallet or not can_debit(wallet, fees)) then
    r = {s = 'REJECTED', c = 203, m = 'tenant platform wallet is at its floor', id = q.id,
         bids = {}, held = {}, xa = q.xa}
  else
    local held, bids, seen = {}, {}, {}
    local fields = {'m', q.m, 'st', 'open', 'ex', fmt(q.ex)}
    for _, b in ipairs(q.bids) do
      local buyer, acct_id, amount = b[1], b[2], b[3]
      local a = not seen[buyer] and acct(p, acct_id) or nil
      seen[buyer] = true
      if a and can_debit(a, amount) then
        if not test then
          local hk = K.holds(p, acct_id)
          redis.call('ZADD', hk, fmt(q.ex), q.id .. '|' .. buyer .. '|' .. fmt(amount))
          note2('zr', hk, q.id .. '|' .. buyer .. '|' .. fmt(amount))
          local v = redis.call('HMGET', a.k, 'held', 'hnext')
          redis.call('HINCRBY', a.k, 'held', fmt(amount))
          note3('h', a.k, 'held', v[1])
          if not v[2] or tonumber(v[2]) > q.ex then
            redis.call('HSET', a.k, 'hnext', fmt(q.ex))
            note3('h', a.k, 'hnext', v[2])
          end
          count(a, 'held', amount)
          fields[#fields + 1] = 'h:' .. buyer
          fields[#fields + 1] = acct_id .. '|' .. fmt(amount)
        end
        held[#held + 1] = {buyer, fmt(amount)}
        if #bids < q.n then bids[#bids + 1] = {bid_id = b[5], price = b[4]} end
      end
    end
    if fees > 0 then
      apply(p, wallet, -fees, 'ping_fee', q.id, now,
            {'inbound', fmt(q.fi), 'outbound', fmt(q.fo), 'campaign', q.c})
    end
    if #held > 0 then
      r = {s = 'ACCEPTED', c = 0, m = '', id = q.id, bids = bids, held = held, xa = q.xa}
    else
      r = {s = 'REJECTED', c = 206, m = 'no buyer bid on the ping', id = q.id, bids = {},
           held = {}, xa = q.xa}
    end
    r.t = q.t
    local answer = cjson.encode(r)
    fields[#fields + 1] = 'a'
    fields[#fields + 1] = answer
    redis.call('HSET', pk, unpack(fields))
    note1('k', pk)
    redis.call('EXPIRE', pk, q.kt)
    redis.call('ZADD', K.pings(p), fmt(q.ex), q.id)
    note2('zr', K.pings(p), q.id)
  end
  r.t = q.t
  if q.k ~= '' then
    local ik = K.idem(p, q.k)
    redis.call('SET', ik, cjson.encode(r), 'EX', q.kt2)
    note1('k', ik)
  end
  r.e = emitted_list()
  return cjson.encode(r)
end)
