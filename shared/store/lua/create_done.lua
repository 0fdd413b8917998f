-- Record a job answered from the result cache: it is created ended.
-- KEYS: job, owner's in-flight set, callbacks stream, the cached output list, the job's output list,
--       the job's items, [idempotency key]
-- ARGV: record ttl, idempotency value, now, events channel, job id, then the record's field/value pairs
-- Returns nil when created; otherwise nothing is kept and the answer is the idempotency key's value
-- when that key was used before, or 'miss' when the cached output list expired meanwhile (the job is
-- then created to run). A round trip sent again finds the job created by the first and changes nothing.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if KEYS[7] then
  local existing = redis.call('GET', KEYS[7])
  if existing then
    redis.call('DEL', KEYS[6])
    return existing
  end
end
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('DEL', KEYS[6])
  return 'miss'
end
if KEYS[7] then redis.call('SET', KEYS[7], ARGV[2], 'EX', ARGV[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('COPY', KEYS[4], KEYS[5], 'REPLACE')
redis.call('EXPIRE', KEYS[5], ARGV[1])
ended(KEYS[1], KEYS[2], KEYS[3], ARGV[5], 'succeeded', ARGV[3], ARGV[1], ARGV[4])
return false
