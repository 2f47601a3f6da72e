-- delivery_precheck.lua: for each job of a batch, its sale record and its recorded delivery
-- decision, so the worker skips refunded sales and jobs already decided (a reclaimed job).
--
-- KEYS[1]  tenant key prefix
-- ARGV[1]  JSON [[lead id, buyer id], ...]
--
-- Returns a flat array: sale record, decision ("" when absent) for each job, in order.

local p, out = KEYS[1], {}
for i, j in ipairs(cjson.decode(ARGV[1])) do
  out[2 * i - 1] = redis.call('HGET', K.lead(p, j[1]), j[2]) or ''
  out[2 * i] = redis.call('HGET', K.dstate(p, j[1]), j[2]) or ''
end
return out
