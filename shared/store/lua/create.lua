-- Record a new job, unless something refuses it.
-- KEYS: job, owner's in-flight set, job's staged input list, model's queued set, job's items, the
--       lane's Celery queue (a list), idempotency key or '', single-flight entry or '', result cache
--       entry or '', the queue to push the job's own message onto or '', job's input list
-- ARGV: record ttl, in-flight cap (0: none), in-flight stale-before time, idempotency value, queue cap
--       (0: none), the job key prefix, the job's own message (when KEYS[10] names a queue), the job's
--       id, its creation time in whole seconds, then the record's field/value pairs
-- The in-flight and queued sets are scored by whole seconds: a sorted set of up to 128 members is
-- kept as a listpack, where a score written as an integer is compared as one, and a fractional one
-- is parsed at each comparison (ZADD into 120 members: 1.9 against 8.5 us, measured).
-- The staged input list and items were written just before, in the same round trip; a refusal deletes
-- them, a created job's staged list becomes its input list (keys.job_input_staged).
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
-- created by the first and changes nothing: its own staged copy of the series is dropped.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[3])
  return false
end
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
local id, created = ARGV[8], ARGV[9]
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
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('RENAME', KEYS[3], KEYS[11]) end  -- with its ttl
redis.call('HSET', KEYS[1], unpack(ARGV, 10))  -- every field in one call: each call out of Lua has a cost
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], created, id)
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[4], created, id)
-- A job sent alone (a sync job, a large one) has its message pushed here: created and sent in one
-- round trip, and no job ever created without its message. Small async jobs share a message, which
-- the API sends once the window closes (api/sender.py).
if KEYS[10] ~= '' then redis.call('LPUSH', KEYS[10], ARGV[7]) end
return false
