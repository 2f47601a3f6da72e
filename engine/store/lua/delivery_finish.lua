-- delivery_finish.lua: the common end of a delivery batch of one tenant: decisions, log
-- entries and acks in one call.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  JSON {"g": consumer group, "ttl": seconds, "lmax": log entries kept per
--                delivery, "m": keys.sold's MAXLEN (~),
--                "j": [[lead, buyer, decision JSON, log entry JSON
--                       (, dead-letter entry fields, delivery_failed event fields)]],
--                "a": [[stream entry id, lead, buyer], ...]: the jobs done}
--
-- A decision already recorded for (lead, buyer) by someone else (another worker that
-- took the same entry over, or a sync try) is never overwritten, except a SYNC claim: the
-- first decision stands, with its money effect, and the caller skips its own. A row the
-- worker gave up on carries its dead-letter entry and delivery_failed event ([k, v, ...],
-- strings): they are written with its decision, so a row whose decision is kept writes
-- neither (the delivery did not fail: someone else decided it).
--
-- Settling the jobs done ("a": decision recorded, money effect applied): the decision and
-- the delivery's log go to the tenant's `sold` stream as one `settled` entry (the lead
-- archive, billing.leads, stores both in SQL) and the log is deleted; then the entries are
-- acked and deleted. The decision stays in `dstate` (its TTL): it is what stops a worker
-- that still holds the same entry, or a retry of it, from sending the lead again.
--
-- Returns the row numbers (1-based, in "j") whose decision was kept that way.

local p, b = KEYS[1], cjson.decode(ARGV[1])
local kept = {}
for i, j in ipairs(b.j) do
  local k = K.dstate(p, j[1])
  local cur = redis.call('HGET', k, j[2])
  local ok, d = false, nil
  if cur then ok, d = pcall(cjson.decode, cur) end
  if ok and type(d) == 'table' and d.o ~= 'SYNC' then
    kept[#kept + 1] = i
  else
    redis.call('HSET', k, j[2], j[3])
    redis.call('EXPIRE', k, b.ttl)
    if j[5] then
      redis.call('XADD', K.dead(K.deliveries(p)), '*', unpack(j[5]))
      redis.call('XADD', K.events(p), 'MAXLEN', '~', '1000000', '*', unpack(j[6]))
    end
  end
  k = K.dlog(p, j[1], j[2])
  if redis.call('RPUSH', k, j[4]) > b.lmax then redis.call('LTRIM', k, -b.lmax, -1) end
  redis.call('EXPIRE', k, b.ttl)
end
if #b.a > 0 then
  local ids, sold = {}, K.sold(p)
  for n, a in ipairs(b.a) do
    ids[n] = a[1]
    local d = redis.call('HGET', K.dstate(p, a[2]), a[3])
    if d and string.sub(d, 1, 11) ~= '{"o":"SYNC"' then
      local lk = K.dlog(p, a[2], a[3])
      redis.call('XADD', sold, 'MAXLEN', '~', b.m, '*', 'settled', '1', 'lead_id', a[2],
                 'buyer', a[3], 'decision', d,
                 'log', '[' .. table.concat(redis.call('LRANGE', lk, 0, -1), ',') .. ']')
      redis.call('DEL', lk)
    end
  end
  redis.call('XACK', K.deliveries(p), b.g, unpack(ids))
  redis.call('XDEL', K.deliveries(p), unpack(ids))
end
return kept
