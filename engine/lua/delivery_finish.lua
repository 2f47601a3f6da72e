-- delivery_finish.lua: the common end of a delivery batch of one tenant: decisions, log
-- entries and acks in one call.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  JSON {"g": consumer group, "ttl": seconds, "lmax": log entries kept per lead,
--                "j": [[lead, buyer, decision JSON, log entry JSON]],
--                "a": [stream entry ids to XACK + XDEL]}
--
-- Returns how many entries were acknowledged.

local p, b = KEYS[1], cjson.decode(ARGV[1])
for _, j in ipairs(b.j) do
  local k = K.dstate(p, j[1])
  redis.call('HSET', k, j[2], j[3])
  redis.call('EXPIRE', k, b.ttl)
  k = K.dlog(p, j[1])
  if redis.call('RPUSH', k, j[4]) > b.lmax then redis.call('LTRIM', k, -b.lmax, -1) end
  redis.call('EXPIRE', k, b.ttl)
end
if #b.a > 0 then
  redis.call('XACK', K.deliveries(p), b.g, unpack(b.a))
  redis.call('XDEL', K.deliveries(p), unpack(b.a))
end
return #b.a
