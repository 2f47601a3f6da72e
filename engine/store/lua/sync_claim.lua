-- sync_claim.lua: claim a sync-mode lead's buyers before its first sale, so the delivery
-- worker holds back their jobs while the ingest request delivers them itself.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  lead id
-- ARGV[2]  the lead's idempotency key (a decided lead claims nothing: it is a replay)
-- ARGV[3]  the claim (JSON delivery decision with state SYNC and its expiry, epoch ms)
-- ARGV[4]  TTL of the claim hash, seconds
-- ARGV[5]  the lead's second idempotency key (its payload's, decide.lua "k2"), or ""
-- ARGV[6..] buyer ids
--
-- Returns the buyer ids this call claimed.

local p = KEYS[1]
if redis.call('EXISTS', K.idem(p, ARGV[2])) == 1 then return {} end
if ARGV[5] ~= '' and redis.call('EXISTS', K.idem(p, ARGV[5])) == 1 then return {} end
local k, out = K.dstate(p, ARGV[1]), {}
for i = 6, #ARGV do
  if redis.call('HSETNX', k, ARGV[i], ARGV[3]) == 1 then out[#out + 1] = ARGV[i] end
end
if #out > 0 then redis.call('EXPIRE', k, ARGV[4]) end
return out
