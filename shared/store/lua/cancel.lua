-- An owner cancels a job.
-- KEYS: job, owner's in-flight set, job's input list, job's output list, callbacks stream
-- ARGV: now, ttl, events channel, job id, owner
-- Returns 'cancelled' (was queued), 'cancelling' (running: stops at its next pass), the terminal
-- status it already had, or 'missing' (also when it is another owner's job).
local s = redis.call('HGET', KEYS[1], 'status')
if not s or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[5] then return 'missing' end
if s == 'queued' then
  redis.call('DEL', KEYS[3], KEYS[4])
  ended(KEYS[1], KEYS[2], KEYS[5], ARGV[4], 'cancelled', ARGV[1], ARGV[2], ARGV[3])
  return 'cancelled'
end
if s == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return s
