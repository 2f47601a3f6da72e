-- ping_release.lua: the open holds of one ping released, idempotently: at the end of its
-- post (the bidders not sold to: a lost auction or backups never tried), or when the
-- seller never posts. No ledger entry (no balance moved).
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  ping id
-- ARGV[2]  now, epoch ms
--
-- An open ping (never posted) becomes "released": a post of it is refused (1061). The
-- ping leaves the sweep's ZSET. Returns the number of holds released (0 on a replay).

local p, ping = KEYS[1], ARGV[1]
clock(ARGV[2])
return atomically(p, function()
  local pk = K.ping(p, ping)
  local v = redis.call('HGETALL', pk)
  local n = 0
  for i = 1, #v, 2 do
    if string.sub(v[i], 1, 2) == 'h:' and unhold_ping(p, ping, string.sub(v[i], 3)) then
      n = n + 1
    end
  end
  local st = redis.call('HGET', pk, 'st')
  if st == 'open' then
    redis.call('HSET', pk, 'st', 'released')
    note3('h', pk, 'st', st)
  end
  if redis.call('ZREM', K.pings(p), ping) == 1 then
    note3('za', K.pings(p), redis.call('HGET', pk, 'ex') or '0', ping)
  end
  return n
end)
