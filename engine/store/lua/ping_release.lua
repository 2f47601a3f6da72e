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
  local n = close_ping(p, ping, 'released')
  if redis.call('ZREM', K.pings(p), ping) == 1 then
    note3('za', K.pings(p), redis.call('HGET', K.ping(p, ping), 'ex') or '0', ping)
  end
  return n
end)
