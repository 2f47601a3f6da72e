-- delivery_requeue.lua: move due delivery retries of one tenant back onto its stream.
--
-- KEYS[1]  the tenant's retry ZSET (keys.retries), score = due time, epoch ms
-- KEYS[2]  the tenant's deliveries stream (keys.deliveries)
-- ARGV[1]  now, epoch milliseconds
-- ARGV[2]  at most this many jobs per call
--
-- Returns how many jobs were moved (ZREM + XADD, atomically, so a job is never lost or doubled).

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(m)))
end
return #due
