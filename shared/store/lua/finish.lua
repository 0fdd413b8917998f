-- A worker stores a job's outcome (with, for a job its last forward pass completed, that pass's
-- results and the job's result cache entry: one script, so a job costs one command to end).
-- KEYS: job, owner's in-flight set, job's input list, job's output list, job's items, callbacks stream,
--       result cache output list or '', result cache entry or '', the model's circuit, then its
--       outcome buckets of the breaker's window (the current one first)
-- ARGV: final status, now, ttl, events channel, job id, breaker min jobs, breaker failure ratio, bucket
--       ttl, cache ttl, cache entry value, n (results to append first), the n results, then the
--       outcome's field/value pairs
-- Only a running job can finish; the first terminal write wins, so a redelivered duplicate cannot
-- overwrite a result, and a job ended meanwhile (cancelled, timed out) gets no more results. A
-- pending cancel request turns success into 'cancelled' and the outcome's fields are not stored.
-- Output and items live as long as the record; a success is cached (shared/cache.py) before it is
-- announced, so a client that repeats the request on seeing the result hits the cache. Returns the
-- final status.
local state = redis.call('HMGET', KEYS[1], 'status', 'cancel_requested', 'lane')
if state[1] ~= 'running' then return state[1] or 'missing' end
local n = tonumber(ARGV[11])
if n > 0 then redis.call('RPUSH', KEYS[4], unpack(ARGV, 12, 11 + n)) end
local final = ARGV[1]
if state[2] == '1' then final = 'cancelled' end
if final ~= 'cancelled' and #ARGV >= 12 + n then redis.call('HSET', KEYS[1], unpack(ARGV, 12 + n)) end
redis.call('HDEL', KEYS[1], 'in_pass')
if final == 'succeeded' then
  redis.call('EXPIRE', KEYS[4], ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[3])
  if KEYS[7] ~= '' then
    redis.call('COPY', KEYS[4], KEYS[7], 'REPLACE')
    redis.call('EXPIRE', KEYS[7], ARGV[9])
    redis.call('SET', KEYS[8], ARGV[10], 'EX', ARGV[9])
  end
else
  redis.call('DEL', KEYS[4])
end
redis.call('DEL', KEYS[3])
-- The circuit breaker (api/breaker.py) counts what the model did, here where every run ends. A closed
-- circuit opens when the window's failures reach the ratio over at least `min jobs`; a half-open one
-- closes at the first success (counting anew) and opens again at the first failure. While open, the
-- outcomes of jobs started before are counted but change nothing. A fine-tuning run's outcome says
-- nothing of how the model serves: it is not counted.
if (final == 'succeeded' or final == 'failed') and state[3] ~= 'train' then
  local outcome = final == 'failed' and 'failed' or 'ok'
  redis.call('HINCRBY', KEYS[10], outcome, 1)
  redis.call('EXPIRE', KEYS[10], ARGV[8])
  local circuit = redis.call('HGET', KEYS[9], 'state')
  if circuit == 'half_open' then
    if outcome == 'ok' then
      redis.call('DEL', KEYS[9], unpack(KEYS, 10))
    else
      redis.call('HSET', KEYS[9], 'state', 'open', 'opened_at', ARGV[2], 'probes', 0)
    end
  elseif not circuit and outcome == 'failed' then
    local ok, failed = 0, 0
    for i = 10, #KEYS do
      local counts = redis.call('HMGET', KEYS[i], 'ok', 'failed')
      ok = ok + tonumber(counts[1] or '0')
      failed = failed + tonumber(counts[2] or '0')
    end
    if ok + failed >= tonumber(ARGV[6]) and failed >= tonumber(ARGV[7]) * (ok + failed) then
      redis.call('HSET', KEYS[9], 'state', 'open', 'opened_at', ARGV[2], 'probes', 0)
    end
  end
end
ended(KEYS[1], KEYS[2], KEYS[6], ARGV[5], final, ARGV[2], ARGV[3], ARGV[4])
return final
