-- breaker_open.lua: a buyer's delivery circuit breaker opened in one worker process
-- (engine/delivery/breaker.py): its Redis mirror for the router, and the tenant's
-- webhook_failing event once per outage of the buyer's webhook.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  buyer id
-- ARGV[2]  the ms the breaker half-opens (epoch)
-- ARGV[3]  the cool-down, ms (the breaker key's lifetime)
-- ARGV[4]  now, epoch milliseconds
-- ARGV[5]  how long one event stands for the buyer's outage, ms
-- ARGV[6]  the webhook_failing event's fields, JSON array [k1, v1, ...] (type first), or ""
--          when this opening is not a new outage (a failed half-open probe re-opened it)
--
-- The event is emitted when K.breaker_told(buyer) is absent, which it then sets for
-- ARGV[5] ms: the other worker processes, each with a breaker of its own that opens in
-- turn, and a webhook that keeps failing, closing and failing again, make one event per
-- buyer in that time. Returns 1 when it emitted the event, else 0.

local p, b = KEYS[1], ARGV[1]
redis.call('SET', K.breaker(p, b), ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', K.breakers(p), ARGV[2], b)
redis.call('ZREMRANGEBYSCORE', K.breakers(p), '-inf', ARGV[4])
if ARGV[6] == '' then return 0 end
if not redis.call('SET', K.breaker_told(p, b), ARGV[2], 'NX', 'PX', ARGV[5]) then return 0 end
redis.call('XADD', K.events(p), 'MAXLEN', '~', '1000000', '*', unpack(cjson.decode(ARGV[6])))
return 1
