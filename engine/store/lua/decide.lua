-- decide.lua: decide, meter and record a micro-batch of leads of one tenant, atomically.
--
-- KEYS[1]  tenant key prefix ("lf:{tenant}:"); every key touched derives from it (one slot)
-- ARGV[1]  JSON call: {"now", "w", "c": candidate table, "leads": [lead, ...]}
-- ARGV[1 + i]  lead i's delivery payload ("x") when the lead does not carry it inline
-- Returns JSON {"r": [decision per lead, in order], "e": events, "m": debits, "x": failures}
--
-- The spec of every field, both ways, is engine/lua_protocol.py (msgspec Structs: Call,
-- LeadCall, Candidate, Reply, Decision, StoredDecision): a new field is added there and
-- read here. A lead's "cs" items are candidate objects (inline, with their own "bd") or
-- keys of the call's table "c" (their "bd" in the lead's "bd"): table objects are shared
-- by the call's leads, so a lead's own parts are never written into them.
--
-- A candidate is skipped (counted as "paused") when its buyer hash says paused, its account
-- is missing, or its delivery circuit breaker is open (K.breaker exists; one EXISTS per
-- buyer per call, written by the delivery worker).
-- Balances and cap counters are written once per call, at its end (finish()), and so is
-- the wallet's ledger entry of the call's platform fees, one per campaign (record_fees). A lead
-- that fails half-way is taken back whole (see decide_all) and answers
-- {"s": "ERROR", "c": 1050, "b": the candidate buyer it was on, if any}; "x" lists such
-- leads as [[lead id, error text], ...].
-- A ping-post post (the lead's "pg": its ping id, engine/ingest/pingpost.py) is refused
-- (REJECTED 1062 posted, 1064 expired or released, 1061 unknown) unless its ping is open, or posted by
-- this lead (a later sync try); it then marks the ping posted by this lead, and each
-- candidate (a held bidder, at its bid) has its hold of the ping released just before it
-- is tried: the sale debits what the hold kept available. Holds of candidates not tried
-- stay (the next try's), until ping_release.lua or expiry.
-- The result is also stored under the idempotency key, so a replay returns it verbatim
-- and changes nothing. A stored value that is not a JSON object is a pointer: the key
-- the record is stored under.

local p = KEYS[1]
local batch = cjson.decode(ARGV[1])
local CANDS = batch.c or {}
local NONE = {}  -- no fingerprints
-- as text once: every stream entry carries it, and Lua formats a number passed to
-- redis.call with a float printf each time
local now, wallet_id = fmt(batch.now), batch.w
clock(batch.now)  -- accounts read with expired ping-post holds have them released
defer_balances()  -- written by finish(): the wallet once per call, not once per lead
local wallet = acct(p, wallet_id)
local LEAD_TTL = fmt(14 * 86400)  -- the sale records of a lead (refunds, returns)
local DELIVERIES = K.deliveries(p)  -- the delivery jobs' stream
-- TTLs as text, once per distinct value of the call (redis.call formats a number with a
-- float printf each time)
local TEXT = {}
local function text(n)
  local t = TEXT[n]
  if not t then t = fmt(n); TEXT[n] = t end
  return t
end

local BUYERS = {}
local MORE = {}  -- decide()'s answer for a lead to be sent again with more candidates
local AT = nil  -- the candidate buyer the current lead is on (an ERROR result names it)
local DEBITED = {lead = 0, fee = 0}  -- money moved by this call, returned for metrics
-- The platform fees of the call's leads, one wallet ledger entry per campaign written by
-- finish() (record_fees): each lead moves the wallet's cached balance (its crossings'
-- events fire at that lead) and adds its fees and id here, journaled like the rest of it.
local FEES, FEE_ORDER = {}, {}  -- campaign -> {fi, fo, n, ids}; campaigns in first-fee order
local FEE_FIELDS = {'fi', 'fo', 'n'}
local LEDGER_OK = nil  -- the ledger stream checked writable (once per call, see charge_fees)

local BUYER_FIELDS = {'paused', 'hid', 'hn', 'did', 'dn', 'wid', 'wn', 'mid', 'mn', 'tn',
                      'sdid', 'sdv', 'smid', 'smv'}

local function buyer(b)
  local s = BUYERS[b]
  if s then return s end
  local k = K.buyer(p, b)
  local v = rcall('HMGET', k, unpack(BUYER_FIELDS))
  -- one constructor, in BUYER_FIELDS' order (a table grown field by field was rehashed four
  -- times): ids as text ('' when absent), counts and spends as numbers (0 when absent)
  s = {k = k, paused = v[1] or '', hid = v[2] or '', hn = tonumber(v[3]) or 0,
       did = v[4] or '', dn = tonumber(v[5]) or 0, wid = v[6] or '', wn = tonumber(v[7]) or 0,
       mid = v[8] or '', mn = tonumber(v[9]) or 0, tn = tonumber(v[10]) or 0,
       sdid = v[11] or '', sdv = tonumber(v[12]) or 0, smid = v[13] or '',
       smv = tonumber(v[14]) or 0, open = false, dirty = false}
  -- the delivery worker keeps this key while the buyer's circuit breaker is open
  s.open = rcall('EXISTS', K.breaker(p, b)) == 1
  BUYERS[b] = s
  return s
end

-- A cap is reached when it is set (>= 0) and the count of its window (the stored count
-- if it belongs to this window id, else 0; spend: plus this price) is at or past it
-- (spend: past it). Written out: a function call per cap cost more than the checks.
local function over_cap(s, cap, win, price)
  local l = cap[1]
  if l >= 0 and (s.hid == win[1] and s.hn or 0) >= l then return true end
  l = cap[2]
  if l >= 0 and (s.did == win[2] and s.dn or 0) >= l then return true end
  l = cap[3]
  if l >= 0 and (s.wid == win[3] and s.wn or 0) >= l then return true end
  l = cap[4]
  if l >= 0 and (s.mid == win[4] and s.mn or 0) >= l then return true end
  l = cap[5]
  if l >= 0 and s.tn >= l then return true end
  l = cap[6]
  if l >= 0 and (s.sdid == win[2] and s.sdv or 0) + price > l then return true end
  l = cap[7]
  return l >= 0 and (s.smid == win[4] and s.smv or 0) + price > l
end

-- what a sale changes in a buyer's cached state (taken back by undo() on a failure)
local COUNTERS = {'hid', 'hn', 'did', 'dn', 'wid', 'wn', 'mid', 'mn', 'tn', 'sdid', 'sdv',
                  'smid', 'smv', 'dirty'}

local function count_sale(s, win, price)
  -- finish() writes these window ids after every lead has committed: a missing one must
  -- fail this lead (taken back), not finish()
  local h, d, w, m = win[1], win[2], win[3], win[4]
  if not (h and d and w and m) then error('lead window ids missing') end
  -- the buyer's COUNTERS as they are now, restored by undo() (an 'f' op, written out)
  local J, n = JOURNAL, NJ
  J[n + 1], J[n + 2], J[n + 3], J[n + 4], J[n + 5], J[n + 6], J[n + 7], J[n + 8] =
    s.hid, s.hn, s.did, s.dn, s.wid, s.wn, s.mid, s.mn
  J[n + 9], J[n + 10], J[n + 11], J[n + 12], J[n + 13], J[n + 14] =
    s.tn, s.sdid, s.sdv, s.smid, s.smv, s.dirty
  J[n + 15], J[n + 16], J[n + 17] = s, COUNTERS, 'f'
  NJ = n + 17
  -- each window's counter moved: restarted when the stored window id is another one
  -- (written out, as over_cap)
  if s.hid ~= h then s.hid, s.hn = h, 1 else s.hn = s.hn + 1 end
  if s.did ~= d then s.did, s.dn = d, 1 else s.dn = s.dn + 1 end
  if s.wid ~= w then s.wid, s.wn = w, 1 else s.wn = s.wn + 1 end
  if s.mid ~= m then s.mid, s.mn = m, 1 else s.mn = s.mn + 1 end
  if s.sdid ~= d then s.sdid, s.sdv = d, price else s.sdv = s.sdv + price end
  if s.smid ~= m then s.smid, s.smv = m, price else s.smv = s.smv + price end
  s.tn = s.tn + 1
  s.dirty = true  -- written once per call by finish()
end

-- cap_reached: a sale that fills a count cap (its counter, just bumped, equals the limit;
-- a limit not set is negative and never equals a count) emits one event on the buyer's
-- account, for the widest window it filled (the one that decides when leads come again).
-- Hourly caps are pacing, not news: not told. A refund frees the slot (refund.lua) and the
-- next sale fills it again: the buyer hash's mark of the window told (its window id; for
-- the total cap, the limit) keeps that to one event per window. The mark is read and
-- written only by the filling sale.
local function cap_reached(L, c, s, a)
  local cap, win = c.cap, L.win
  local n, window, field, mark  -- the limit, its window, the buyer hash's mark of it
  if s.tn == cap[5] then n, window, field, mark = cap[5], 'total', 'crt', fmt(cap[5])
  elseif s.mn == cap[4] then n, window, field, mark = cap[4], 'month', 'crm', win[4]
  elseif s.wn == cap[3] then n, window, field, mark = cap[3], 'week', 'crw', win[3]
  else n, window, field, mark = cap[2], 'day', 'crd', win[2] end
  local told = rcall('HGET', s.k, field)
  if told == mark then return end
  rcall('HSET', s.k, field, mark)
  note3('h', s.k, field, told)
  emit(p, 'cap_reached', a, now, {'buyer', c.b, 'campaign', L.c, 'cap', fmt(n),
                                  'window', window, 'ref', L.id})
end

-- a lead's platform fees (fee_in of them inbound): the wallet debited now, the ledger entry
-- left to record_fees(). The entry is written after every lead has committed, so it must
-- not fail then: the ledger stream is checked here, where the lead can still be taken back
-- (a key of another type fails this lead, as its own XADD did), and Redis refuses no write
-- for memory once the script has written (each lead writes its idempotency record). The
-- lead's id, which the entry's ref lists, is checked here too (a string without a comma).
-- An XADD that fails all the same (a stream whose last id is the largest there is) is the
-- fallback's: the books stay even, the call raises, and its leads' fees are not charged.
local function charge_fees(L, fee_in, fees)
  if type(L.id) ~= 'string' or sfind(L.id, ',', 1, true) then
    error('lead id: not a string without a comma')
  end
  if not LEDGER_OK then
    local t = rcall('TYPE', K.ledger(p)).ok
    if t ~= 'stream' and t ~= 'none' then
      error('WRONGTYPE the tenant ledger is not a stream')
    end
    LEDGER_OK = true
  end
  local b0 = move(wallet, -fees)
  local e = FEES[L.c]
  if not e then
    e = {fi = 0, fo = 0, n = 0, ids = {}}  -- left empty if this lead is taken back: skipped
    FEES[L.c] = e
    FEE_ORDER[#FEE_ORDER + 1] = L.c
  end
  local J, n = JOURNAL, NJ  -- e's sums as they are, restored by undo() (an 'f' op)
  J[n + 1], J[n + 2], J[n + 3], J[n + 4], J[n + 5], J[n + 6] = e.fi, e.fo, e.n, e, FEE_FIELDS, 'f'
  NJ = n + 6
  e.fi, e.fo, e.n = e.fi + fee_in, e.fo + fees - fee_in, e.n + 1
  e.ids[e.n] = L.id  -- a slot past n (a lead taken back) is overwritten or never read
  crossings(p, wallet, b0, -fees, L.id, now)
end

-- The call's fee entries, one per campaign: ref the ids of its leads (comma-separated),
-- inbound and outbound the sums, balance the wallet's after the entry (the wallet has no
-- other entry in a call: it is no buyer's account). One that fails (unreachable, see
-- charge_fees) has its debit taken off the wallet's deferred change, so that the balance
-- written matches the ledger; the first error is returned.
local function record_fees()
  local first, after = nil, 0
  for i = #FEE_ORDER, 1, -1 do  -- each entry's balance: the wallet's less the entries after it
    local e = FEES[FEE_ORDER[i]]
    e.after = after
    after = after + e.fi + e.fo
  end
  for _, c in ipairs(FEE_ORDER) do
    local e = FEES[c]
    if e.n > 0 then
      local total = e.fi + e.fo
      local ok, err = pcall(function()
        ledger_entry(p, wallet.id, -total, fmt(wallet.bal + e.after), 'fee',
                     tconcat(e.ids, ',', 1, e.n), now,
                     {'inbound', fmt(e.fi), 'outbound', fmt(e.fo), 'campaign', c})
      end)
      if not ok then
        wallet.pending, wallet.bal = wallet.pending + total, wallet.bal + total
        first = first or err
      end
    end
  end
  return first
end

-- The cap counters of every buyer that sold in this call, every deferred balance, and the
-- events stream's trimming. It runs after every lead has committed, so it must not fail
-- half-way: what it writes was checked inside the leads (acct(), count_sale), and each
-- write is made on its own; the first error is returned for the caller to raise.
local function finish()
  local first = record_fees()  -- before the balances: a failed one is not flushed
  for _, s in pairs(BUYERS) do
    if s.dirty then
      local ok, err = pcall(rcall, 'HSET', s.k, 'hid', s.hid, 'hn', fmt(s.hn),
                 'did', s.did, 'dn', fmt(s.dn), 'wid', s.wid, 'wn', fmt(s.wn),
                 'mid', s.mid, 'mn', fmt(s.mn), 'tn', fmt(s.tn), 'sdid', s.sdid,
                 'sdv', fmt(s.sdv), 'smid', s.smid, 'smv', fmt(s.smv))
      first = first or (not ok and err) or nil
      s.dirty = nil
    end
  end
  first = flush_balances() or first
  if next(EMITTED) then trim_events(p) end
  return first
end

-- whether a fingerprint of fps is marked; for two (one command: solar's email and phone;
-- a key table for more cost more), their keys too, for mark_sold
local function any_exists(fps)
  local n = #fps
  if n == 2 then
    local k1, k2 = K.dup(p, fps[1]), K.dup(p, fps[2])
    return rcall('EXISTS', k1, k2) > 0, k1, k2
  end
  for i = 1, n do
    if rcall('EXISTS', K.dup(p, fps[i])) == 1 then return true end
  end
  return false
end

-- SET's GET option (Redis 6.2) on the keys the script found absent: the reply is then a nil
-- bulk, which Lua gets as false, where plain SET's status reply is a new table ({ok =
-- 'OK'}: ~1,000 instructions a SET with its collection). What is written, and the SET ...
-- PX that the AOF and replicas get, are the same.
-- k1, k2: the keys of two fingerprints, when any_exists made them
local function mark_sold(fps, lead_id, ttl, k1, k2)
  if k2 then
    rcall('SET', k1, lead_id, 'EX', ttl, 'GET')
    note1('k', k1)  -- checked absent before (any_exists): this lead created it
    rcall('SET', k2, lead_id, 'EX', ttl, 'GET')
    note1('k', k2)
    return
  end
  for i = 1, #fps do
    local k = K.dup(p, fps[i])
    rcall('SET', k, lead_id, 'EX', ttl, 'GET')
    note1('k', k)  -- checked absent before (any_exists): this lead created it
  end
end

-- the order in which candidates are tried (nil: their own order, 1 to #L.cs), the rotation
-- position it starts at and the cursor as stored (for undo): round
-- robin starts at the campaign cursor. A sale moves the cursor one position past where
-- this lead *started*, not past the buyer who took it: jumping past the taker would skip
-- the turns of the buyers in between who could not take this lead, and a buyer with a
-- narrow filter could then starve (A, B, C with B and C on CA leads only, CA and TX leads
-- alternating: C never got one).
local function order(L)
  local stored = L.rr == 1 and rcall('HGET', K.cursors(p), L.c)
  if L.rr ~= 1 or #L.q == 0 then return nil, 0, stored end
  local start = tonumber(stored or '0') % #L.q
  local o, seen = {}, {}
  for off = 0, #L.q - 1 do
    local ci = L.q[(start + off) % #L.q + 1]
    if ci > 0 and not seen[ci] then seen[ci] = true; o[#o + 1] = ci end
  end
  return o, start, stored
end

-- the sale record's fields: one table for the call, each sale sets every field and encodes
-- it (a table per sale cost its allocation and collection)
local REC = {s = 'sold'}

-- A candidate table object keeps what its sales format the same way all call long: its fee
-- and debit as text, and its ledger entry's extra fields (for its campaign: an inline
-- candidate is no other lead's).
local function sell(L, c, bd, s, a, price)
  local ref = L.id
  local fee, debit, extra = c.fs, c.ds, c.lx
  if not fee then fee, debit = fmt(c.fo), fmt(-c.p); c.fs, c.ds = fee, debit end
  if not extra or extra[4] ~= L.c then extra = {'buyer', c.b, 'campaign', L.c}; c.lx = extra end
  apply(p, a, -c.p, 'lead', ref, now, extra, debit)
  DEBITED.lead = DEBITED.lead + c.p
  count_sale(s, L.win, c.p)
  local cap = c.cap
  if s.dn == cap[2] or s.tn == cap[5] or s.mn == cap[4] or s.wn == cap[3] then
    cap_reached(L, c, s, a)
  end
  if #bd > 0 then mark_sold(bd, ref, TEXT[L.dt] or text(L.dt)) end
  -- a new field: a lead is sold to a buyer once (the sync waterfall's later tries go to
  -- buyers it has not tried)
  local lk = K.lead(p, ref)
  L.lk = lk  -- its lifetime is set by one(), last
  local rec = REC
  rec.a, rec.p, rec.f, rec.w, rec.bd, rec.cd = c.a, price, fee, L.win, bd, L.d
  rcall('HSET', lk, c.b, jencode(rec))
  note2('hd', lk, c.b)
  local dk = DELIVERIES
  note2('x', dk, rcall('XADD', dk, '*', 'lead_id', ref, 'buyer', c.b, 'campaign', L.c,
        'account', c.a, 'price', price, 'fee', fee, 'lead', L.x, 'ts', now,
        'supplier', L.sp or ''))
end

-- a lead's decision (sold: its sales, [buyer, price as text] each)
local function result(L, s, c, m, sold)
  return {id = L.id, s = s, c = c, m = m, sold = sold or {}, t = L.t}
end

-- a post's ping: nil when it may be sold (marked posted by this lead), else the refusal
local function post_of(L)
  local pk = K.ping(p, L.pg)
  local v = rcall('HMGET', pk, 'st', 'ex')
  if not v[1] then return result(L, 'REJECTED', 1061, 'unknown ping') end
  local mine = 'posted:' .. L.id
  if v[1] == mine then return nil end
  if v[1] ~= 'open' then
    if ssub(v[1], 1, 7) == 'posted:' then
      return result(L, 'REJECTED', 1062, 'the ping was already posted')
    end
    return result(L, 'REJECTED', 1064, 'the ping expired')
  end
  if tonumber(v[2]) <= batch.now then
    return result(L, 'REJECTED', 1064, 'the ping expired')
  end
  rcall('HSET', pk, 'st', mine)
  note3('h', pk, 'st', v[1])
  return nil
end

local function decide(L)
  local test = L.t == 1
  if L.pg then
    local refused = post_of(L)
    if refused then return refused end
  end
  -- test leads get the full decision, duplicates included (they only never mark one)
  local dup, k1, k2 = any_exists(L.d)  -- k1, k2: the keys of two, for mark_sold
  if dup then
    return result(L, 'DUPLICATED', 100, 'duplicate of a lead sold in this campaign')
  end
  if not test and L.fi > 0 and (not wallet or not can_debit(wallet, L.fi)) then
    return result(L, 'REJECTED', 203, 'tenant platform wallet is at its floor')
  end
  -- why the candidates tried did not take the lead, counted
  local sold, n_cap, n_paused, n_funds, n_dup, n_wallet = {}, 0, 0, 0, 0, 0
  -- the platform fees of this lead, debited from the wallet as ONE balance change at the end
  local fee_in = test and 0 or L.fi
  local fees = fee_in
  local tries, start, cursor = nil, 0, nil  -- their own order unless round robin
  if L.rr == 1 then tries, start, cursor = order(L) end
  local cs, pg, win = L.cs, L.pg, L.win
  for k = 1, tries and #tries or #cs do
    local ci = tries and tries[k] or k
    if #sold >= L.n then break end
    AT = nil  -- until this candidate's buyer is known
    local c, bd = cs[ci], nil
    if type(c) == 'string' then  -- a key of the call's table; its fingerprints: the lead's
      c, bd = CANDS[c], L.bd and L.bd[ci] or NONE
    else
      bd = c.bd
    end
    AT = c.b  -- the buyer a failure from here on is reported with (the sync waterfall, engine/ingest/waterfall.py, skips it)
    local s, a = BUYERS[c.b] or buyer(c.b), ACCTS[c.a] or acct(p, c.a)
    if pg and a then unhold_ping(p, pg, c.b) end  -- a post: this bidder's hold
    if s.paused ~= '' or s.open or not a then
      n_paused = n_paused + 1
    elseif #bd > 0 and any_exists(bd) then
      n_dup = n_dup + 1
    elseif over_cap(s, c.cap, win, c.p) then
      n_cap = n_cap + 1
    elseif not can_debit(a, c.p) then
      n_funds = n_funds + 1
      if not test and a.paused == '' and not a.closed then
        pause(p, a, 'floor', now, {'buyer', c.b, 'ref', L.id})
      end
    elseif not test and c.fo > 0 and (not wallet or not can_debit(wallet, fees + c.fo)) then
      n_wallet = n_wallet + 1
      break
    else
      local price = c.ps  -- as text: the sale record, the job, the answer
      if not price then price = fmt(c.p); c.ps = price end
      if not test then
        sell(L, c, bd, s, a, price)
        fees = fees + c.fo
        if L.rr == 1 then
          local ck = K.cursors(p)
          rcall('HSET', ck, L.c, start + 1)
          note3('h', ck, L.c, cursor)
        end
      end
      local sale = c.sd  -- [buyer, price]: the same for every lead of the call, never changed
      if not sale then sale = {c.b, price}; c.sd = sale end
      sold[#sold + 1] = sale
    end
  end
  AT = nil  -- what fails from here on (fees, marks, the record) is not one buyer's
  -- "mr": the first of more eligible buyers, who could not take it all; the engine sends
  -- the lead again with every one (decide_all takes this try's writes back)
  if L.mr == 1 and #sold < L.n and n_wallet == 0 then return MORE end
  local tried = n_cap + n_paused + n_funds + n_dup + n_wallet
  if #sold == 0 and tried > 0 and n_dup == tried then
    fees, fee_in = 0, 0  -- a duplicate for every buyer: no inbound fee (only valid, new leads)
  end
  if fees > 0 then
    charge_fees(L, fee_in, fees)
    DEBITED.fee = DEBITED.fee + fees
  end
  if #sold > 0 then
    if not test then mark_sold(L.d, L.id, TEXT[L.dt] or text(L.dt), k1, k2) end
    return result(L, 'ACCEPTED', 0, '', sold)
  end
  if tried == 0 then return result(L, 'REJECTED', 200, 'no buyer matched the lead') end
  if n_dup == tried then
    return result(L, 'DUPLICATED', 101, 'every matching buyer already bought this lead')
  end
  if n_wallet > 0 then return result(L, 'REJECTED', 203, 'tenant platform wallet is at its floor') end
  if n_cap == tried then return result(L, 'REJECTED', 201, 'every matching buyer is at a cap') end
  return result(L, 'REJECTED', 202, sformat(
    'no matching buyer could take the lead (%d at cap, %d paused, %d without funds)',
    n_cap, n_paused, n_funds))
end

-- the stored record under key k (`key`: its Redis key, when made already), a pointer
-- followed (nil when absent or expired), and the key it was found under
local function record(k, key)
  local v = rcall('GET', key or K.idem(p, k))
  if v and ssub(v, 1, 1) ~= '{' then
    k = v
    v = rcall('GET', K.idem(p, k))
  end
  return v, k
end

-- one lead: its stored result on a replay, else its decision, stored under its keys; and
-- the decision as JSON when it was encoded for its record (the reply reuses it)
local function one(i, L)
  L.x = L.x or ARGV[i + 1]
  local ik = K.idem(p, L.k)
  local prior, at = record(L.k, ik)
  if not prior and L.k2 then
    prior, at = record(L.k2)
    -- a key seen for the first time on a payload replay: it must name the same lead for
    -- its own TTL, past the payload window. A final record is copied; a pending one (a
    -- sync waterfall still writing it) is pointed to
    if prior then
      local pending = sfind(prior, '"sy":', 1, true) ~= nil
      rcall('SET', ik, pending and at or prior, 'EX', TEXT[L.kt] or text(L.kt))
      note1('k', ik)
    end
  end
  if prior then
    local r = cjson.decode(prior)
    r.rp = true
    return r
  end
  local r = decide(L)
  if r == MORE then return r end  -- no record: the lead is decided again
  if L.k2 then  -- absent before (record): this lead creates it
    local k2 = K.idem(p, L.k2)
    rcall('SET', k2, L.k, 'EX', text(L.k2t))
    note1('k', k2)
  end
  -- the lead's last writes: nothing can fail after the record, so neither needs an undo
  -- (the sale record's lifetime is set last: a sync try n found it with try 1's field)
  local json = jencode(r)
  rcall('SET', ik, json, 'EX', TEXT[L.kt] or text(L.kt), 'GET')  -- absent (record): see mark_sold
  if r.s == 'ACCEPTED' and L.t ~= 1 then rcall('EXPIRE', L.lk or K.lead(p, L.id), LEAD_TTL) end
  return r, json
end

-- Each lead is all or nothing. One that fails half-way (a Redis error on one of its
-- writes, a Lua error) has every write it made taken back (the journal, _lib.lua) and
-- answers ERROR 1050 with no idempotency record, so a retry decides it afresh and is
-- charged once; the leads after it are decided as usual. Its error text goes back in
-- "x" for the engine's log.
local out, failed = {}, {}  -- out: each lead's decision as JSON, in order
local function decide_all()
  JOURNAL = {}
  for i, L in ipairs(batch.leads) do
    NJ, AT = 0, nil
    local lead_debits, fee_debits = DEBITED.lead, DEBITED.fee
    local ok, r, json = pcall(one, i, L)
    if ok and r == MORE then  -- nothing of this try is kept
      undo()
      DEBITED.lead, DEBITED.fee = lead_debits, fee_debits
      r, json = {id = L.id, s = 'MORE', c = 0, sold = {}, t = L.t}, nil
    end
    if not ok then
      undo()
      DEBITED.lead, DEBITED.fee = lead_debits, fee_debits
      local id = type(L) == 'table' and type(L.id) == 'string' and L.id or ''
      failed[#failed + 1] = {id, type(r) == 'table' and tostring(r.err) or tostring(r)}
      r = {id = id, s = 'ERROR', c = 1050, sold = {}, b = AT,
           m = 'the lead could not be decided; nothing was charged',
           t = type(L) == 'table' and L.t == 1 and 1 or 0}
      json = nil
    end
    out[i] = json or jencode(r)
  end
end

-- the deferred writes happen even when the call fails (an error outside any one lead:
-- undo() itself): the leads decided before it keep their ledger entries, so their
-- balances must be written too; then the error reaches the caller
local ok, err = pcall(decide_all)
JOURNAL = nil  -- finish() writes nothing it would have to take back
local unfinished = finish()
if not ok then error(err, 0) end  -- as raised: no second position prefix
if unfinished then error(unfinished, 0) end
-- the reply: the decisions as encoded above, joined (a second cjson pass over each cost
-- more than the concatenation)
return '{"r":[' .. tconcat(out, ',') .. '],"e":' .. jencode(emitted_list())
  .. ',"m":["' .. fmt(DEBITED.lead) .. '","' .. fmt(DEBITED.fee) .. '"],"x":'
  .. jencode(failed) .. '}'
