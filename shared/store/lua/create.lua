-- Record a new job.
-- KEYS: job, owner's in-flight set, job's input list, model's queued set, job's items, [idempotency key]
-- ARGV: record ttl, in-flight cap (0: none), in-flight stale-before time, idempotency value, then the
--       record's field/value pairs
-- The input list and items were written just before, in the same round trip; a refusal deletes them.
-- Returns nil when the job was created; the idempotency key's value when that key was used before
-- (nothing is kept); 'in-flight:<n>' when the owner already has `cap` jobs in flight.
local function refuse(answer)
  redis.call('DEL', KEYS[3], KEYS[5])
  return answer
end
if KEYS[6] then
  local existing = redis.call('GET', KEYS[6])
  if existing then return refuse(existing) end
end
local cap = tonumber(ARGV[2])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
  local n = redis.call('ZCARD', KEYS[2])
  if n >= cap then return refuse('in-flight:' .. n) end
end
if KEYS[6] then redis.call('SET', KEYS[6], ARGV[4], 'EX', ARGV[1]) end
local created
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if ARGV[i] == 'created_at' then created = ARGV[i + 1] end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('ZADD', KEYS[2], created, id)
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[4], created, id)
return false
