-- delivery_finish.lua: the common end of a delivery batch of one tenant: decisions, log
-- entries and acks in one call.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  JSON {"g": consumer group, "ttl": seconds, "lmax": log entries kept per lead,
--                "m": keys.sold's MAXLEN (~),
--                "j": [[lead, buyer, decision JSON, log entry JSON, job's entry id
--                       ("" for a sync try) (, dead-letter entry fields,
--                       delivery_failed event fields)]],
--                "a": [[stream entry id, lead, buyer, keep], ...]: the jobs done}
--
-- A decision already recorded for (lead, buyer) by someone else (another worker that
-- took the same entry over, or a sync try) is never overwritten, except a SYNC claim: the
-- first decision stands, with its money effect, and the caller skips its own. A row the
-- worker gave up on carries its dead-letter entry and delivery_failed event ([k, v, ...],
-- strings): they are written with its decision, so a row whose decision is kept writes
-- neither (the delivery did not fail: someone else decided it).
--
-- A job's entry that is gone from the stream was settled (below) by another worker that
-- held the same entry: its decision stands too, so the row is kept the same way.
--
-- Settling a job done ("a": its decision recorded and its money effect applied): the
-- decision and the lead's delivery log so far go to the tenant's `sold` stream in one
-- entry (`settled`, for the lead archive: billing.leads), the buyer's decision leaves
-- `dstate` and, once no buyer of the lead has one, the delivery log is deleted; then the
-- entry is acked and deleted. `keep` = 1 (a worker that took over an expired sync claim)
-- leaves the decision in `dstate` until its TTL, so a sync try that outlived its claim
-- still finds it there. A job with no decision recorded (none to settle) is only acked.
--
-- Returns the row numbers (1-based, in "j") whose decision was kept that way.

local p, b = KEYS[1], cjson.decode(ARGV[1])
local stream, kept = K.deliveries(p), {}
for i, j in ipairs(b.j) do
  local k = K.dstate(p, j[1])
  local cur = redis.call('HGET', k, j[2])
  local ok, d = false, nil
  if cur then ok, d = pcall(cjson.decode, cur) end
  local settled = false
  if ok and type(d) == 'table' and d.o ~= 'SYNC' then
    kept[#kept + 1] = i
  elseif j[5] ~= '' and #redis.call('XRANGE', stream, j[5], j[5]) == 0 then
    kept[#kept + 1], settled = i, true  -- and its log gone with it: nothing written
  else
    redis.call('HSET', k, j[2], j[3])
    redis.call('EXPIRE', k, b.ttl)
    if j[6] then
      redis.call('XADD', K.dead(stream), '*', unpack(j[6]))
      redis.call('XADD', K.events(p), 'MAXLEN', '~', '1000000', '*', unpack(j[7]))
    end
  end
  if not settled then
    k = K.dlog(p, j[1])
    if redis.call('RPUSH', k, j[4]) > b.lmax then redis.call('LTRIM', k, -b.lmax, -1) end
    redis.call('EXPIRE', k, b.ttl)
  end
end
if #b.a > 0 then
  local ids, sold = {}, K.sold(p)
  for n, a in ipairs(b.a) do
    ids[n] = a[1]
    local k = K.dstate(p, a[2])
    local d = redis.call('HGET', k, a[3])
    if d and string.sub(d, 1, 11) ~= '{"o":"SYNC"' then
      local lk = K.dlog(p, a[2])
      redis.call('XADD', sold, 'MAXLEN', '~', b.m, '*', 'settled', '1', 'lead_id', a[2],
                 'buyer', a[3], 'decision', d,
                 'log', '[' .. table.concat(redis.call('LRANGE', lk, 0, -1), ',') .. ']')
      if a[4] ~= 1 then
        redis.call('HDEL', k, a[3])
        if redis.call('EXISTS', k) == 0 then redis.call('DEL', lk) end
      end
    end
  end
  redis.call('XACK', stream, b.g, unpack(ids))
  redis.call('XDEL', stream, unpack(ids))
end
return kept
