-- _lib.lua: the balance-change machinery shared by every script that moves money.
-- (Prepended, after the generated key helpers K.*, to decide/adjust/refund/account_settings.)
--
-- Units: every amount and balance is integer micros ($1.00 = 1000000). Lua numbers are
-- doubles, exact for integers below 2^53; billing.money caps amounts at 1e15, far below.
-- Balances themselves only ever change through HINCRBY, which is exact int64 arithmetic.
-- A script may defer those writes (defer_balances): apply() then moves the cached balance
-- and flush_balances() writes each account's net change once, in the same script.
-- Time: `now` is Unix epoch milliseconds, passed in by the caller (scripts stay pure).
--
-- Account hash fields: bal, floor, alert (the balance alert in force), ualert (the account's
-- own alert set through the API, which a reload keeps; absent = the config's), rthr
-- (auto-recharge threshold, 0 = none),
-- ar ("1" = auto-recharge on), minb (minimum balance, "" = none), mode (none|manual|realtime),
-- paused ("" or the reason), closed ("1" = closed to new debits), held (micros held by
-- open ping-post holds, "" = 0), hnext (the earliest expiry of those holds, epoch ms).
-- available = bal - held: a debit or a new hold must keep it at or above the floor.

-- The library functions called per lead, as locals (here, so that the scripts _lib.lua is
-- prepended to see them): a global's field such as redis.call costs two table lookups a
-- call, a local none (~1,700 instructions a sold lead of decide.lua). The scripts' other
-- code may still use the globals.
local rcall, jencode, tconcat = redis.call, cjson.encode, table.concat
local sformat, sfind, ssub, smatch = string.format, string.find, string.sub, string.match

local function fmt(n) return sformat('%d', n) end

local EMITTED = {}   -- event type -> count, returned to the caller for metrics
local DEFERRED = false -- balance writes wait for flush_balances() (defer_balances)
local ACCTS = {}     -- account id -> cached settings + balance, for this call only

-- The undo journal of one unit of work (a lead of decide.lua; the whole call of the other
-- money scripts, see atomically). Redis never rolls a script back, so a unit that fails
-- half-way (a Redis error on one of its writes, a Lua error) would keep, say, a debit and
-- its ledger entry without the lead's delivery job or idempotency record, and the seller's
-- retry would charge again. While JOURNAL is a table, every write below
-- notes how to take it back, and undo() takes the unit's writes back, newest first.
-- The journal is flat, so a write costs no table: each op pushes its values, then its name
-- (undo() reads it backwards). Ops: 'x' stream, id: XDEL (and DEL of a stream left empty
-- with no consumer group, as one the XADD created); 'k' key: DEL (a key the unit created);
-- 'hd' key, field: HDEL (a field it created); 'h' key, field, old: the old value back
-- (HDEL when there was none); 'n' key, field, delta: a HINCRBY taken back; 'r' key,
-- value, pttl: a deleted key set again (its lifetime left, ms; -1 none); 'sr' set, member:
-- SREM; 'c' table, key, n: a count taken back; 'f' v1..vn, table, names: a Lua table's
-- fields back; 'za' key, score, member: a ZREM taken back (ZADD); 'zr' key, member: a
-- ZADD taken back (ZREM). JOURNAL is one table for the whole call, NJ the
-- current unit's length in it (entries past NJ are stale and ignored).
local JOURNAL, NJ = nil, 0

local function note1(op, x)
  if JOURNAL then JOURNAL[NJ + 1], JOURNAL[NJ + 2] = x, op; NJ = NJ + 2 end
end

local function note2(op, x, y)
  if JOURNAL then JOURNAL[NJ + 1], JOURNAL[NJ + 2], JOURNAL[NJ + 3] = x, y, op; NJ = NJ + 3 end
end

local function note3(op, x, y, z)
  if not JOURNAL then return end
  local n = NJ
  JOURNAL[n + 1], JOURNAL[n + 2], JOURNAL[n + 3], JOURNAL[n + 4] = x, y, z, op
  NJ = n + 4
end

local ACCT_STATE = {'bal', 'pending', 'paused'}  -- what a script changes in an account

-- an account's ACCT_STATE fields as they are now, restored by undo() (an 'f' op, written
-- out: a loop over the names cost twice as much on every lead)
local function keep_acct(a)
  if not JOURNAL then return end
  local J, n = JOURNAL, NJ
  J[n + 1], J[n + 2], J[n + 3], J[n + 4], J[n + 5], J[n + 6] =
    a.bal, a.pending, a.paused, a, ACCT_STATE, 'f'
  NJ = n + 6
end

local function count(t, key, n)
  t[key] = (t[key] or 0) + n
  note3('c', t, key, n)
end

-- take the current unit's writes back, newest first
local function undo()
  local J, i = JOURNAL, NJ
  while i > 0 do
    local what = J[i]
    if what == 'x' then
      local stream = J[i - 2]
      rcall('XDEL', stream, J[i - 1])
      -- the XADD may have created the stream: an empty one nobody reads (no consumer
      -- group) is the same as none
      if rcall('XLEN', stream) == 0 and #rcall('XINFO', 'GROUPS', stream) == 0 then
        rcall('DEL', stream)
      end
      i = i - 3
    elseif what == 'k' then
      rcall('DEL', J[i - 1])
      i = i - 2
    elseif what == 'hd' then
      rcall('HDEL', J[i - 2], J[i - 1])
      i = i - 3
    elseif what == 'h' then
      if J[i - 1] then rcall('HSET', J[i - 3], J[i - 2], J[i - 1])
      else rcall('HDEL', J[i - 3], J[i - 2]) end
      i = i - 4
    elseif what == 'n' then
      rcall('HINCRBY', J[i - 3], J[i - 2], fmt(-J[i - 1]))
      i = i - 4
    elseif what == 'r' then
      local ttl = J[i - 1]
      if ttl == -1 then rcall('SET', J[i - 3], J[i - 2])
      elseif ttl > 0 then rcall('SET', J[i - 3], J[i - 2], 'PX', ttl) end
      -- 0: its lifetime ran out while the script ran (GET reads the script's start
      -- time, PTTL the clock): gone, as it would be now
      i = i - 4
    elseif what == 'sr' then
      rcall('SREM', J[i - 2], J[i - 1])
      i = i - 3
    elseif what == 'c' then
      local t, key = J[i - 3], J[i - 2]
      t[key] = t[key] - J[i - 1]
      i = i - 4
    elseif what == 'za' then
      rcall('ZADD', J[i - 3], J[i - 2], J[i - 1])
      i = i - 4
    elseif what == 'zr' then
      rcall('ZREM', J[i - 2], J[i - 1])
      i = i - 3
    else  -- 'f'
      local t, names = J[i - 2], J[i - 1]
      local base = i - 3 - #names
      for f = 1, #names do t[names[f]] = J[base + f] end
      i = base
    end
  end
  NJ = 0
end

-- The clock of the call (epoch ms) for holds: a script that sets it (clock(now)) has the
-- expired holds of every account it reads released as it reads it (acct()); without it
-- they still count as held until a script with a clock or the sweep releases them (an
-- available balance then only looks smaller, never larger).
local NOW = nil
local function clock(now) NOW = tonumber(now) end
-- A hold released here past its expiry is counted in EMITTED as 'hold:expired' (with the
-- events: journaled, so a unit taken back does not count it), and every script returns
-- EMITTED (emitted_list): leadflow_holds_total{event="expired"} (engine.obs.telemetry).
local HOLD_EXPIRED = 'hold:expired'
local LAZY_MAX = 64  -- the most expired holds of one account released by one read

-- One open hold released: the account's holds ZSET is the authority (a member removed
-- here was open), its `held` sum and `hnext` follow, and the ping's h:<buyer> field goes.
-- Returns true when the hold was open. Every write is journaled.
local function unhold(p, acct_id, ping, buyer, amount)
  local pk, field = K.ping(p, ping), 'h:' .. buyer
  local raw = rcall('HGET', pk, field)
  if raw then
    rcall('HDEL', pk, field)
    note3('h', pk, field, raw)
  end
  local hk, member = K.holds(p, acct_id), ping .. '|' .. buyer .. '|' .. fmt(amount)
  local score = rcall('ZSCORE', hk, member)
  if not score then return false end
  rcall('ZREM', hk, member)
  note3('za', hk, score, member)
  local ak = K.acct(p, acct_id)
  local v = rcall('HMGET', ak, 'held', 'hnext')
  rcall('HINCRBY', ak, 'held', fmt(-amount))
  note3('h', ak, 'held', v[1])
  local first = rcall('ZRANGE', hk, 0, 0, 'WITHSCORES')
  if first[2] then rcall('HSET', ak, 'hnext', first[2])
  else rcall('HDEL', ak, 'hnext') end
  note3('h', ak, 'hnext', v[2])
  local a = ACCTS[acct_id]
  if a then count(a, 'held', -amount) end
  return true
end

-- A ping's hold of `buyer`, if still open ("<account>|<micros>" in the ping hash): released
local function unhold_ping(p, ping, buyer)
  local raw = rcall('HGET', K.ping(p, ping), 'h:' .. buyer)
  if not raw then return false end
  local acct_id, amount = smatch(raw, '^(.*)|(%d+)$')
  return unhold(p, acct_id, ping, buyer, tonumber(amount))
end

-- A ping closed: every open hold of it released, and the ping, if still open (never
-- posted), marked `state` ("released", "expired"). Returns the holds released. Leaving
-- the sweep's ZSET is the caller's.
local function close_ping(p, ping, state)
  local pk = K.ping(p, ping)
  local v = rcall('HGETALL', pk)
  local n = 0
  for i = 1, #v, 2 do
    if ssub(v[i], 1, 2) == 'h:' and unhold_ping(p, ping, ssub(v[i], 3)) then
      n = n + 1
    end
  end
  local st = rcall('HGET', pk, 'st')
  if st == 'open' then
    rcall('HSET', pk, 'st', state)
    note3('h', pk, 'st', st)
  end
  return n
end

-- the account's holds past their expiry (at most LAZY_MAX), released
local function expire_holds(p, id)
  local hk = K.holds(p, id)
  local due = rcall('ZRANGEBYSCORE', hk, '-inf', fmt(NOW), 'LIMIT', 0, LAZY_MAX)
  for i = 1, #due do
    local ping, buyer, amount = smatch(due[i], '^(.*)|(.*)|(%d+)$')
    if ping and unhold(p, id, ping, buyer, tonumber(amount)) then
      count(EMITTED, HOLD_EXPIRED, 1)
    end
  end
end

local function acct(p, id)
  local a = ACCTS[id]
  if a then return a end
  local k = K.acct(p, id)
  local v = rcall('HMGET', k, 'bal', 'floor', 'alert', 'rthr', 'ar', 'minb', 'mode', 'paused',
                       'closed', 'held', 'hnext')
  if not v[1] then return nil end
  -- refused here, where the unit that reads it can still be taken back: HINCRBY would
  -- refuse it only when the balance is written, after the unit's ledger entries. As
  -- HINCRBY reads it (no leading zero, no '-0'), and below 2^53, where Lua's doubles stop
  -- being exact integers. Not the money cap (1e15): refunds may credit past it, and an
  -- account refused here could not even be paused or given new settings
  local n = tonumber(v[1])
  if not n or fmt(n) ~= v[1] or math.abs(n) >= 9007199254740992 then
    error('account ' .. id .. ': balance is not an integer')
  end
  a = {
    id = id, k = k, bal = tonumber(v[1]), floor = tonumber(v[2]) or DEFAULT_FLOOR,
    alert = tonumber(v[3]) or 0, rthr = tonumber(v[4]) or 0, ar = (v[5] == '1'),
    minb = tonumber(v[6] or ''), mode = v[7] or 'manual', paused = v[8] or '', closed = (v[9] == '1'),
    held = tonumber(v[10] or '') or 0,
  }
  ACCTS[id] = a
  if a.held ~= 0 and NOW then
    local hnext = tonumber(v[11] or '')
    if hnext and hnext <= NOW then
      -- outside the unit's journal: a hold past its expiry is released whatever becomes of
      -- the unit that read the account, which stays cached for the call's later units (an
      -- undo that put the holds back left them seeing less than the account has)
      local j = JOURNAL
      JOURNAL = nil
      local ok, err = pcall(expire_holds, p, id)
      JOURNAL = j
      if not ok then error(err, 0) end
    end
  end
  return a
end

local NO_FIELDS = {}  -- a ledger entry without extra fields
local LEDGER_KEYS = {}  -- tenant prefix -> its ledger stream's key, made once per script
local EVENTS_MAXLEN = '1000000'  -- the events stream keeps about this many entries

-- While a unit is journaled its XADD does not trim (undo() could not bring trimmed
-- entries back): the script trims once, when its units are done (trim_events).
local function emit(p, etype, a, now, extra)
  local args
  if JOURNAL then
    args = {'XADD', K.events(p), '*'}
  else
    args = {'XADD', K.events(p), 'MAXLEN', '~', EVENTS_MAXLEN, '*'}
  end
  local head = {'type', etype, 'account', a.id, 'balance', fmt(a.bal), 'ts', now}
  for i = 1, #head do args[#args + 1] = head[i] end
  for i = 1, #extra do args[#args + 1] = extra[i] end
  note2('x', args[2], rcall(unpack(args)))
  count(EMITTED, etype, 1)
end

-- The buyer_paused event (account, balance, ts, the caller's extra fields such as buyer
-- and ref, then reason) and its count for leadflow_buyers_paused_total{reason}: an
-- account paused here, or one buyer paused by hand (buyer_pause.lua).
local function paused_event(p, a, reason, now, extra)
  local e = extra or {}
  e[#e + 1] = 'reason'; e[#e + 1] = reason
  emit(p, 'buyer_paused', a, now, e)
  count(EMITTED, 'paused:' .. reason, 1)
end

-- an account's paused field set to `reason` ('' resumes), in Redis and in its cached copy
local function set_paused(a, reason)
  rcall('HSET', a.k, 'paused', reason)  -- first: a refused write leaves nothing to undo
  keep_acct(a)
  note3('h', a.k, 'paused', a.paused)
  a.paused = reason
end

local function trim_events(p)
  rcall('XTRIM', K.events(p), 'MAXLEN', '~', EVENTS_MAXLEN)
end

local function pause(p, a, reason, now, extra)
  if a.paused ~= '' then return end
  set_paused(a, reason)
  paused_event(p, a, reason, now, extra)
end

local function resume(p, a, now)
  set_paused(a, '')
  emit(p, 'buyer_resumed', a, now, {})
end

-- A settings change against the unchanged balance (account_settings.lua on a reload,
-- alert_set.lua for PUT /alert): below_alert(a) is read with the settings before the
-- change and after it; balance_alert fires when the change makes it true (`ref` names the
-- change), once, as a debit's crossing does. Nothing for billing "none" or a closed account.
local function below_alert(a) return a.mode ~= 'none' and a.alert > 0 and a.bal < a.alert end

local function alert_crossed(p, a, was_below, now, ref)
  if not a.closed and not was_below and below_alert(a) then
    emit(p, 'balance_alert', a, now, {'threshold', fmt(a.alert), 'ref', ref})
  end
end

-- A debit of `amount` is allowed when it keeps the available balance (the balance less
-- the account's open holds) at or above the floor. Accounts in billing mode "none" have no
-- balance checks. A ping-post sale releases its own hold first (decide.lua).
local function can_debit(a, amount)
  if a.mode == 'none' then return true end
  if a.closed or a.paused ~= '' then return false end
  return a.bal - a.held - amount >= a.floor
end

-- One ledger entry: `balance` is the account's balance after it (text); `extra` the entry's
-- other fields, name, value, ...; `dtext` the delta as text, when the caller has it
local function ledger_entry(p, account, delta, balance, kind, ref, now, extra, dtext)
  -- the tenant's one ledger stream (archived to SQL by the ledger worker); an account's
  -- history is its entries there plus the archive's rows (engine.store.ledger_tail,
  -- billing.archive.history): a second, per-account stream cost 12 % of decide.lua
  local stream = LEDGER_KEYS[p]
  if not stream then stream = K.ledger(p); LEDGER_KEYS[p] = stream end
  local id = rcall('XADD', stream, '*', 'account', account, 'delta', dtext or fmt(delta),
                        'balance', balance, 'kind', kind, 'ref', ref, 'ts', now, unpack(extra))
  note2('x', stream, id)
  return id
end

local function write_ledger(p, a, delta, kind, ref, now, extra, dtext)
  return ledger_entry(p, a.id, delta, fmt(a.bal), kind, ref, now, extra, dtext)
end

-- An account's balance moved by `delta` micros (negative = debit), in Redis or, deferred,
-- in its cached copy (journaled either way); returns the balance before
local function move(a, delta)
  local b0 = a.bal
  keep_acct(a)
  if DEFERRED then
    a.pending = (a.pending or 0) + delta  -- the net change flush_balances() writes
    a.bal = b0 + delta
  else
    a.bal = rcall('HINCRBY', a.k, 'bal', fmt(delta))
    note3('h', a.k, 'bal', fmt(b0))
  end
  return b0
end

-- The threshold crossings of a balance change from b0 to a.bal: each event fires once per
-- downward crossing and re-arms by itself once a credit lifts the balance back over the
-- threshold. balance_negative is such a crossing of zero: a debit taking the balance from 0
-- or more to below 0 (toward the floor); it fires again only after a credit brought the
-- balance back to 0 or more.
local function crossings(p, a, b0, delta, ref, now)
  if a.mode == 'none' then return end
  local b1 = a.bal
  if delta < 0 then
    if a.alert > 0 and b0 >= a.alert and b1 < a.alert then
      emit(p, 'balance_alert', a, now, {'threshold', fmt(a.alert)})
    end
    if b1 < 0 and b0 >= 0 then
      emit(p, 'balance_negative', a, now, {'floor', fmt(a.floor)})
    end
    if a.ar and a.rthr > 0 and b0 >= a.rthr and b1 < a.rthr then
      emit(p, 'recharge_needed', a, now, {'threshold', fmt(a.rthr), 'ref', ref})
    end
    if a.minb and not a.ar and b0 >= a.minb and b1 < a.minb then
      pause(p, a, 'min_balance', now, {'ref', ref})
    end
  elseif delta > 0 and (a.paused == 'floor' or a.paused == 'min_balance') then
    if b1 >= math.max(a.minb or 0, 0) then resume(p, a, now) end
  end
end

-- Move a balance by `delta` micros (negative = debit), write its ledger entry and flag
-- threshold crossings (crossings above). `dtext`: the delta as text (ledger_entry).
local function apply(p, a, delta, kind, ref, now, extra, dtext)
  local b0 = move(a, delta)
  local id = write_ledger(p, a, delta, kind, ref, now, extra or NO_FIELDS, dtext)
  crossings(p, a, b0, delta, ref, now)
  return id
end

-- decide.lua debits the tenant wallet once per lead and a buyer's account once per sale:
-- written as they happen, a 16-lead call wrote the wallet's balance 16 times. Deferred,
-- each account is written once per call. The caller must run flush_balances() before it
-- returns, also when its work fails half-way (see decide.lua), so that the balances
-- always match the ledger entries already written.
local function defer_balances() DEFERRED = true end

-- Each account's write on its own: one that fails (which acct() makes unreachable) must
-- not cost the others theirs. Returns the first error, for the caller to raise.
local function flush_balances()
  local first
  for _, a in pairs(ACCTS) do
    if a.pending and a.pending ~= 0 then
      local ok, err = pcall(rcall, 'HINCRBY', a.k, 'bal', fmt(a.pending))
      first = first or (not ok and err) or nil
    end
    a.pending = nil
  end
  return first
end

-- A money script's body, all or nothing: its writes through the helpers above (and the
-- ones it notes itself) are journaled and taken back if it fails; then the error reaches
-- the caller. decide.lua journals per lead instead, as a call holds many.
local function atomically(p, body)
  JOURNAL, NJ = {}, 0
  local ok, res = pcall(body)
  if not ok then undo() end
  JOURNAL = nil
  if not ok then error(res, 0) end  -- as raised: no second position prefix
  if next(EMITTED) then trim_events(p) end
  return res
end

local function emitted_list()
  local out = {}
  for k, v in pairs(EMITTED) do
    if v ~= 0 then out[#out + 1] = k; out[#out + 1] = v end  -- 0: taken back by undo()
  end
  return out
end
