-- A job's record, and with it, once it succeeded, its results: one round trip for a waiter's answer.
-- KEYS: job, job's output list, job's items
-- Returns {record as HGETALL gives it, the output list or false, the items or false}; the outputs and
-- items only when the job succeeded (a running job's partial outputs are not read).
local record = redis.call('HGETALL', KEYS[1])
local outputs, items = false, false
if redis.call('HGET', KEYS[1], 'status') == 'succeeded' then
  outputs = redis.call('LRANGE', KEYS[2], 0, -1)
  items = redis.call('GET', KEYS[3])
end
return {record, outputs, items}
