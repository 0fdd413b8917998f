-- A worker stores a job's outcome.
-- KEYS: job, owner's in-flight set, job's input list, job's output list, job's items, callbacks stream,
--       the model's circuit, then its outcome buckets of the breaker's window (the current one first)
-- ARGV: final status, now, ttl, events channel, job id, breaker min jobs, breaker failure ratio, bucket
--       ttl, then the outcome's field/value pairs
-- Only a running job can finish; the first terminal write wins, so a redelivered duplicate cannot
-- overwrite a result. A pending cancel request turns success into 'cancelled' and the outcome's
-- fields are not stored. Output and items live as long as the record. Returns the final status.
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'running' then return s or 'missing' end
local final = ARGV[1]
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then final = 'cancelled' end
if final ~= 'cancelled' then
  if #ARGV >= 9 then redis.call('HSET', KEYS[1], unpack(ARGV, 9)) end
end
if final == 'succeeded' then
  redis.call('EXPIRE', KEYS[4], ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[3])
else
  redis.call('DEL', KEYS[4])
end
redis.call('DEL', KEYS[3])
-- The circuit breaker (api/breaker.py) counts what the model did, here where every run ends. A closed
-- circuit opens when the window's failures reach the ratio over at least `min jobs`; a half-open one
-- closes at the first success (counting anew) and opens again at the first failure. While open, the
-- outcomes of jobs started before are counted but change nothing. A fine-tuning run's outcome says
-- nothing of how the model serves: it is not counted.
if (final == 'succeeded' or final == 'failed') and redis.call('HGET', KEYS[1], 'lane') ~= 'train' then
  local outcome = final == 'failed' and 'failed' or 'ok'
  redis.call('HINCRBY', KEYS[8], outcome, 1)
  redis.call('EXPIRE', KEYS[8], ARGV[8])
  local state = redis.call('HGET', KEYS[7], 'state')
  if state == 'half_open' then
    if outcome == 'ok' then
      redis.call('DEL', KEYS[7], unpack(KEYS, 8))
    else
      redis.call('HSET', KEYS[7], 'state', 'open', 'opened_at', ARGV[2], 'probes', 0)
    end
  elseif not state and outcome == 'failed' then
    local ok, failed = 0, 0
    for i = 8, #KEYS do
      local counts = redis.call('HMGET', KEYS[i], 'ok', 'failed')
      ok = ok + tonumber(counts[1] or '0')
      failed = failed + tonumber(counts[2] or '0')
    end
    if ok + failed >= tonumber(ARGV[6]) and failed >= tonumber(ARGV[7]) * (ok + failed) then
      redis.call('HSET', KEYS[7], 'state', 'open', 'opened_at', ARGV[2], 'probes', 0)
    end
  end
end
ended(KEYS[1], KEYS[2], KEYS[6], ARGV[5], final, ARGV[2], ARGV[3], ARGV[4])
return final
