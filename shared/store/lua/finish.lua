-- A worker stores a job's outcome.
-- KEYS: job, owner's in-flight set, job's input list, job's output list, job's items, callbacks stream
-- ARGV: final status, now, ttl, events channel, job id, then the outcome's field/value pairs
-- Only a running job can finish; the first terminal write wins, so a redelivered duplicate cannot
-- overwrite a result. A pending cancel request turns success into 'cancelled' and the outcome's
-- fields are not stored. Output and items live as long as the record. Returns the final status.
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'running' then return s or 'missing' end
local final = ARGV[1]
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then final = 'cancelled' end
if final ~= 'cancelled' then
  for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
if final == 'succeeded' then
  redis.call('EXPIRE', KEYS[4], ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[3])
else
  redis.call('DEL', KEYS[4])
end
redis.call('DEL', KEYS[3])
ended(KEYS[1], KEYS[2], KEYS[6], ARGV[5], final, ARGV[2], ARGV[3], ARGV[4])
return final
