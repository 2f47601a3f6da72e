-- ping_sweep.lua: the holds of expired pings released, a bounded batch per call (the
-- sweep worker calls it until it returns fewer pings than the batch).
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  now, epoch ms
-- ARGV[2]  the most pings released by this call
--
-- A ping past its expiry ("ex" <= now, the pings ZSET's score) has every open hold
-- released; an open ping (never posted) becomes "expired" (a post of it: 1061). Posted
-- pings' leftover holds (a post cut off mid-way) are released alike. All or nothing.
-- Returns {pings released, holds released}.

local p, limit = KEYS[1], tonumber(ARGV[2])
clock(ARGV[1])
return atomically(p, function()
  local zk = K.pings(p)
  local due = redis.call('ZRANGEBYSCORE', zk, '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, limit)
  local holds = 0
  for i = 1, #due, 2 do
    local ping = due[i]
    holds = holds + close_ping(p, ping, 'expired')
    redis.call('ZREM', zk, ping)
    note3('za', zk, due[i + 1], ping)
  end
  return {#due / 2, holds}
end)
