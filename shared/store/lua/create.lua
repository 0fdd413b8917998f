-- Record a new job, unless something refuses it.
-- KEYS: job, owner's in-flight set, job's input list, model's queued set, job's items, the lane's
--       Celery queue (a list), idempotency key or '', single-flight entry or '', result cache entry or ''
-- ARGV: record ttl, in-flight cap (0: none), in-flight stale-before time, idempotency value, queue cap
--       (0: none), the job key prefix, then the record's field/value pairs
-- The input list and items were written just before, in the same round trip; a refusal deletes them.
-- Returns nil when the job was created. Otherwise nothing is kept and the answer is, in this order:
--   the idempotency key's value, when that key was used before (the earlier job is replayed);
--   'cached:<fields>' when the result cache holds an answer to the same request (shared/cache.py):
--   the API records the job answered from it (create_done.lua). Looked up here, not in a round
--   trip of its own before, so a request the cache cannot answer costs one round trip, not two;
--   'joined:<id>' when the single-flight entry names a job still queued or running for the same
--   request (api/service.py): that job answers this request. The held job's record is the one key
--   not in KEYS: which job it is is known only here;
--   'queue-full:<n>' when the queue holds `queue cap` messages or more;
--   'in-flight:<n>' when the owner already has `in-flight cap` jobs in flight.
-- A round trip the client sends again (its reply was lost to a dropped connection) finds the job
-- created by the first and changes nothing.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local function refuse(answer)
  redis.call('DEL', KEYS[3], KEYS[5])
  return answer
end
if KEYS[7] ~= '' then
  local existing = redis.call('GET', KEYS[7])
  if existing then return refuse(existing) end
end
if KEYS[9] ~= '' then
  local hit = redis.call('GET', KEYS[9])
  if hit then return refuse('cached:' .. hit) end
end
local id, created
for i = 7, #ARGV, 2 do
  if ARGV[i] == 'id' then id = ARGV[i + 1] end
  if ARGV[i] == 'created_at' then created = ARGV[i + 1] end
end
if KEYS[8] ~= '' then
  local held = redis.call('GET', KEYS[8])
  if held and held ~= id then
    local s = redis.call('HGET', ARGV[6] .. held, 'status')
    if s == 'queued' or s == 'running' then return refuse('joined:' .. held) end
  end
end
local queue_cap = tonumber(ARGV[5])
if queue_cap > 0 then
  local depth = redis.call('LLEN', KEYS[6])
  if depth >= queue_cap then return refuse('queue-full:' .. depth) end
end
local cap = tonumber(ARGV[2])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
  local n = redis.call('ZCARD', KEYS[2])
  if n >= cap then return refuse('in-flight:' .. n) end
end
if KEYS[8] ~= '' then redis.call('SET', KEYS[8], id, 'EX', ARGV[1]) end
if KEYS[7] ~= '' then redis.call('SET', KEYS[7], ARGV[4], 'EX', ARGV[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))  -- every field in one call: each call out of Lua has a cost
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], created, id)
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[4], created, id)
return false
