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
-- Balances and cap counters are written once per call, at its end (finish()). A lead
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

local BUYERS = {}
local MORE = {}  -- decide()'s answer for a lead to be sent again with more candidates
local AT = nil  -- the candidate buyer the current lead is on (an ERROR result names it)
local DEBITED = {lead = 0, fee = 0}  -- money moved by this call, returned for metrics
local BUYER_FIELDS = {'paused', 'hid', 'hn', 'did', 'dn', 'wid', 'wn', 'mid', 'mn', 'tn',
                      'sdid', 'sdv', 'smid', 'smv'}

local function buyer(b)
  local s = BUYERS[b]
  if s then return s end
  local k = K.buyer(p, b)
  local v = redis.call('HMGET', k, unpack(BUYER_FIELDS))
  s = {k = k}
  for i = 1, #BUYER_FIELDS do s[BUYER_FIELDS[i]] = v[i] or '' end
  for _, f in ipairs({'hn', 'dn', 'wn', 'mn', 'tn', 'sdv', 'smv'}) do s[f] = tonumber(s[f]) or 0 end
  -- the delivery worker keeps this key while the buyer's circuit breaker is open
  s.open = redis.call('EXISTS', K.breaker(p, b)) == 1
  BUYERS[b] = s
  return s
end

-- current count of a window: the stored count if it belongs to this window id, else 0
local function in_window(s, idf, nf, win)
  if s[idf] == win then return s[nf] end
  return 0
end

local function over(limit, used) return limit >= 0 and used >= limit end
local function over_spend(limit, used, price) return limit >= 0 and used + price > limit end

local function over_cap(s, cap, win, price)
  return over(cap[1], in_window(s, 'hid', 'hn', win[1]))
      or over(cap[2], in_window(s, 'did', 'dn', win[2]))
      or over(cap[3], in_window(s, 'wid', 'wn', win[3]))
      or over(cap[4], in_window(s, 'mid', 'mn', win[4]))
      or over(cap[5], s.tn)
      or over_spend(cap[6], in_window(s, 'sdid', 'sdv', win[2]), price)
      or over_spend(cap[7], in_window(s, 'smid', 'smv', win[4]), price)
end

-- a window's counter moved by `by`: restarted when the stored window id is another one
local function bump(s, idf, nf, w, by)
  if s[idf] ~= w then s[idf] = w; s[nf] = by else s[nf] = s[nf] + by end
end

-- what a sale changes in a buyer's cached state (taken back by undo() on a failure)
local COUNTERS = {'hid', 'hn', 'did', 'dn', 'wid', 'wn', 'mid', 'mn', 'tn', 'sdid', 'sdv',
                  'smid', 'smv', 'dirty'}

-- a buyer's COUNTERS as they are now, restored by undo() (an 'f' op, written out)
local function keep_counters(s)
  local J, n = JOURNAL, NJ
  J[n + 1], J[n + 2], J[n + 3], J[n + 4], J[n + 5], J[n + 6], J[n + 7], J[n + 8] =
    s.hid, s.hn, s.did, s.dn, s.wid, s.wn, s.mid, s.mn
  J[n + 9], J[n + 10], J[n + 11], J[n + 12], J[n + 13], J[n + 14] =
    s.tn, s.sdid, s.sdv, s.smid, s.smv, s.dirty
  J[n + 15], J[n + 16], J[n + 17] = s, COUNTERS, 'f'
  NJ = n + 17
end

local function count_sale(s, win, price)
  -- finish() writes these window ids after every lead has committed: a missing one must
  -- fail this lead (taken back), not finish()
  if not (win[1] and win[2] and win[3] and win[4]) then error('lead window ids missing') end
  keep_counters(s)
  bump(s, 'hid', 'hn', win[1], 1); bump(s, 'did', 'dn', win[2], 1)
  bump(s, 'wid', 'wn', win[3], 1); bump(s, 'mid', 'mn', win[4], 1)
  bump(s, 'sdid', 'sdv', win[2], price); bump(s, 'smid', 'smv', win[4], price)
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
  local told = redis.call('HGET', s.k, field)
  if told == mark then return end
  redis.call('HSET', s.k, field, mark)
  note3('h', s.k, field, told)
  emit(p, 'cap_reached', a, now, {'buyer', c.b, 'campaign', L.c, 'cap', fmt(n),
                                  'window', window, 'ref', L.id})
end

-- The cap counters of every buyer that sold in this call, every deferred balance, and the
-- events stream's trimming. It runs after every lead has committed, so it must not fail
-- half-way: what it writes was checked inside the leads (acct(), count_sale), and each
-- write is made on its own; the first error is returned for the caller to raise.
local function finish()
  local first
  for _, s in pairs(BUYERS) do
    if s.dirty then
      local ok, err = pcall(redis.call, 'HSET', s.k, 'hid', s.hid, 'hn', fmt(s.hn),
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

local function any_exists(fps)
  for i = 1, #fps do
    if redis.call('EXISTS', K.dup(p, fps[i])) == 1 then return true end
  end
  return false
end

local function mark_sold(fps, lead_id, ttl)
  for i = 1, #fps do
    local k = K.dup(p, fps[i])
    redis.call('SET', k, lead_id, 'EX', ttl)
    note1('k', k)  -- checked absent before (any_exists): this lead created it
  end
end

-- the order in which candidates are tried, the rotation position it starts at and the
-- cursor as stored (for undo): round
-- robin starts at the campaign cursor. A sale moves the cursor one position past where
-- this lead *started*, not past the buyer who took it: jumping past the taker would skip
-- the turns of the buyers in between who could not take this lead, and a buyer with a
-- narrow filter could then starve (A, B, C with B and C on CA leads only, CA and TX leads
-- alternating: C never got one).
local function order(L)
  local stored = L.rr == 1 and redis.call('HGET', K.cursors(p), L.c)
  if L.rr ~= 1 or #L.q == 0 then
    local o = {}
    for i = 1, #L.cs do o[i] = i end
    return o, 0, stored
  end
  local start = tonumber(stored or '0') % #L.q
  local o, seen = {}, {}
  for off = 0, #L.q - 1 do
    local ci = L.q[(start + off) % #L.q + 1]
    if ci > 0 and not seen[ci] then seen[ci] = true; o[#o + 1] = ci end
  end
  return o, start, stored
end

local function sell(L, c, bd, s, a)
  local ref = L.id
  apply(p, a, -c.p, 'lead', ref, now, {'buyer', c.b, 'campaign', L.c})
  DEBITED.lead = DEBITED.lead + c.p
  count_sale(s, L.win, c.p)
  local cap = c.cap
  if s.dn == cap[2] or s.tn == cap[5] or s.mn == cap[4] or s.wn == cap[3] then
    cap_reached(L, c, s, a)
  end
  mark_sold(bd, ref, L.dt)
  -- a new field: a lead is sold to a buyer once (the sync waterfall's later tries go to
  -- buyers it has not tried)
  local lk = K.lead(p, ref)
  redis.call('HSET', lk, c.b, cjson.encode({a = c.a, p = fmt(c.p), f = fmt(c.fo),
             w = L.win, s = 'sold', bd = bd, cd = L.d}))
  note2('hd', lk, c.b)
  local dk = K.deliveries(p)
  note2('x', dk, redis.call('XADD', dk, '*', 'lead_id', ref, 'buyer', c.b, 'campaign', L.c,
        'account', c.a, 'price', fmt(c.p), 'fee', fmt(c.fo), 'lead', L.x, 'ts', now))
end

-- a post's ping: nil when it may be sold (marked posted by this lead), else the refusal
local function post_of(L)
  local pk = K.ping(p, L.pg)
  local v = redis.call('HMGET', pk, 'st', 'ex')
  if not v[1] then return {s = 'REJECTED', c = 1061, m = 'unknown ping'} end
  local mine = 'posted:' .. L.id
  if v[1] == mine then return nil end
  if v[1] ~= 'open' then
    if string.sub(v[1], 1, 7) == 'posted:' then
      return {s = 'REJECTED', c = 1062, m = 'the ping was already posted'}
    end
    return {s = 'REJECTED', c = 1064, m = 'the ping expired'}
  end
  if tonumber(v[2]) <= batch.now then
    return {s = 'REJECTED', c = 1064, m = 'the ping expired'}
  end
  redis.call('HSET', pk, 'st', mine)
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
  if any_exists(L.d) then
    return {s = 'DUPLICATED', c = 100, m = 'duplicate of a lead sold in this campaign'}
  end
  if not test and L.fi > 0 and (not wallet or not can_debit(wallet, L.fi)) then
    return {s = 'REJECTED', c = 203, m = 'tenant platform wallet is at its floor'}
  end
  local sold, why = {}, {cap = 0, paused = 0, funds = 0, dup = 0, wallet = 0}
  -- the platform fees of this lead, debited from the wallet as ONE balance change at the end
  local fee_in = test and 0 or L.fi
  local fees = fee_in
  local tries, start, cursor = order(L)
  for _, ci in ipairs(tries) do
    if #sold >= L.n then break end
    AT = nil  -- until this candidate's buyer is known
    local c, bd = L.cs[ci], nil
    if type(c) == 'string' then  -- a key of the call's table; its fingerprints: the lead's
      c, bd = CANDS[c], L.bd and L.bd[ci] or NONE
    else
      bd = c.bd
    end
    AT = c.b  -- the buyer a failure from here on is reported with (the sync waterfall, engine/ingest/waterfall.py, skips it)
    local s, a = buyer(c.b), acct(p, c.a)
    if L.pg and a then unhold_ping(p, L.pg, c.b) end  -- a post: this bidder's hold
    if s.paused ~= '' or s.open or not a then
      why.paused = why.paused + 1
    elseif #bd > 0 and any_exists(bd) then
      why.dup = why.dup + 1
    elseif over_cap(s, c.cap, L.win, c.p) then
      why.cap = why.cap + 1
    elseif not can_debit(a, c.p) then
      why.funds = why.funds + 1
      if not test and a.paused == '' and not a.closed then
        pause(p, a, 'floor', now, {'buyer', c.b, 'ref', L.id})
      end
    elseif not test and c.fo > 0 and (not wallet or not can_debit(wallet, fees + c.fo)) then
      why.wallet = why.wallet + 1
      break
    else
      if not test then
        sell(L, c, bd, s, a)
        fees = fees + c.fo
        if L.rr == 1 then
          local ck = K.cursors(p)
          redis.call('HSET', ck, L.c, start + 1)
          note3('h', ck, L.c, cursor)
        end
      end
      sold[#sold + 1] = {c.b, fmt(c.p)}
    end
  end
  AT = nil  -- what fails from here on (fees, marks, the record) is not one buyer's
  -- "mr": the first of more eligible buyers, who could not take it all; the engine sends
  -- the lead again with every one (decide_all takes this try's writes back)
  if L.mr == 1 and #sold < L.n and why.wallet == 0 then return MORE end
  local tried = why.cap + why.paused + why.funds + why.dup + why.wallet
  if #sold == 0 and tried > 0 and why.dup == tried then
    fees, fee_in = 0, 0  -- a duplicate for every buyer: no inbound fee (only valid, new leads)
  end
  if fees > 0 then
    apply(p, wallet, -fees, 'fee', L.id, now,
          {'inbound', fmt(fee_in), 'outbound', fmt(fees - fee_in), 'campaign', L.c})
    DEBITED.fee = DEBITED.fee + fees
  end
  if #sold > 0 then
    if not test then mark_sold(L.d, L.id, L.dt) end
    return {s = 'ACCEPTED', c = 0, m = '', sold = sold}
  end
  if tried == 0 then return {s = 'REJECTED', c = 200, m = 'no buyer matched the lead'} end
  if why.dup == tried then
    return {s = 'DUPLICATED', c = 101, m = 'every matching buyer already bought this lead'}
  end
  if why.wallet > 0 then return {s = 'REJECTED', c = 203, m = 'tenant platform wallet is at its floor'} end
  if why.cap == tried then return {s = 'REJECTED', c = 201, m = 'every matching buyer is at a cap'} end
  return {s = 'REJECTED', c = 202, m = string.format(
    'no matching buyer could take the lead (%d at cap, %d paused, %d without funds)',
    why.cap, why.paused, why.funds)}
end

-- the stored record under key k, a pointer followed (nil when absent or expired), and
-- the key it was found under
local function record(k)
  local v = redis.call('GET', K.idem(p, k))
  if v and string.sub(v, 1, 1) ~= '{' then
    k = v
    v = redis.call('GET', K.idem(p, k))
  end
  return v, k
end

-- one lead: its stored result on a replay, else its decision, stored under its keys
local function one(i, L)
  L.x = L.x or ARGV[i + 1]
  local ik = K.idem(p, L.k)
  local prior, at = record(L.k)
  if not prior and L.k2 then
    prior, at = record(L.k2)
    -- a key seen for the first time on a payload replay: it must name the same lead for
    -- its own TTL, past the payload window. A final record is copied; a pending one (a
    -- sync waterfall still writing it) is pointed to
    if prior then
      local pending = string.find(prior, '"sy":', 1, true) ~= nil
      redis.call('SET', ik, pending and at or prior, 'EX', L.kt)
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
  r.id, r.t = L.id, L.t
  if not r.sold then r.sold = {} end
  if L.k2 then  -- absent before (record): this lead creates it
    local k2 = K.idem(p, L.k2)
    redis.call('SET', k2, L.k, 'EX', L.k2t)
    note1('k', k2)
  end
  -- the lead's last writes: nothing can fail after the record, so neither needs an undo
  -- (the sale record's lifetime is set last: a sync try n found it with try 1's field)
  redis.call('SET', ik, cjson.encode(r), 'EX', L.kt)
  if r.s == 'ACCEPTED' and L.t ~= 1 then redis.call('EXPIRE', K.lead(p, L.id), LEAD_TTL) end
  return r
end

-- Each lead is all or nothing. One that fails half-way (a Redis error on one of its
-- writes, a Lua error) has every write it made taken back (the journal, _lib.lua) and
-- answers ERROR 1050 with no idempotency record, so a retry decides it afresh and is
-- charged once; the leads after it are decided as usual. Its error text goes back in
-- "x" for the engine's log.
local out, failed = {}, {}
local function decide_all()
  JOURNAL = {}
  for i, L in ipairs(batch.leads) do
    NJ, AT = 0, nil
    local lead_debits, fee_debits = DEBITED.lead, DEBITED.fee
    local ok, r = pcall(one, i, L)
    if ok and r == MORE then  -- nothing of this try is kept
      undo()
      DEBITED.lead, DEBITED.fee = lead_debits, fee_debits
      r = {id = L.id, s = 'MORE', c = 0, sold = {}, t = L.t}
    end
    if not ok then
      undo()
      DEBITED.lead, DEBITED.fee = lead_debits, fee_debits
      local id = type(L) == 'table' and type(L.id) == 'string' and L.id or ''
      failed[#failed + 1] = {id, type(r) == 'table' and tostring(r.err) or tostring(r)}
      r = {id = id, s = 'ERROR', c = 1050, sold = {}, b = AT,
           m = 'the lead could not be decided; nothing was charged',
           t = type(L) == 'table' and L.t == 1 and 1 or 0}
    end
    out[i] = r
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
return cjson.encode({r = out, e = emitted_list(), m = {fmt(DEBITED.lead), fmt(DEBITED.fee)},
                     x = failed})
