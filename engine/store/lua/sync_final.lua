-- sync_final.lua: the end of a sync waterfall: the final result under the lead's
-- idempotency key, derived keys of later tries removed, unused claims released, and the
-- lead's dedupe fingerprints forgotten when no buyer kept it.
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  JSON {"k": idempotency key, "r": result JSON ("" = keep), "kt": its TTL (s),
--                "lead": lead id, "rel": [buyers to release], "del": [idempotency keys],
--                "fp": [fingerprints]}
--
-- Returns 1.

local p, a = KEYS[1], cjson.decode(ARGV[1])
if a.r ~= '' then redis.call('SET', K.idem(p, a.k), a.r, 'EX', a.kt) end
if #a.rel > 0 then redis.call('HDEL', K.dstate(p, a.lead), unpack(a.rel)) end
for _, k in ipairs(a.del) do redis.call('DEL', K.idem(p, k)) end
for _, fp in ipairs(a.fp) do
  local dk = K.dup(p, fp)
  if redis.call('GET', dk) == a.lead then redis.call('DEL', dk) end
end
return 1
