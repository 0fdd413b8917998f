-- A worker claims a job for a delivery of its message.
-- KEYS: job, model's queued set, job's input list, job's output list, callbacks stream
-- ARGV: now, worker name, max deliveries, ttl, events channel, job id, the owners' in-flight set
--       prefix (keys.in_flight without the owner)
-- Returns {the status afterwards, lost, the record as HGETALL gives it}: one round trip claims the job
-- and reads it. Anything but 'running' tells the worker to skip the job (cancelled, finished,
-- expired: 'missing', with an empty record). `lost` counts the deliveries whose worker died while
-- the job was in a forward pass, this one's predecessor included: a job lost before runs alone. A
-- redelivered job starts over: its partial output is cleared. A job whose worker died `max
-- deliveries` times while it was in a forward pass ends 'failed' instead of killing worker after
-- worker. The owner's in-flight set is the one key not in KEYS: whose it is, the record says.
local function claim()
  local s = redis.call('HGET', KEYS[1], 'status')
  if not s then return 'missing', 0 end
  if s ~= 'queued' and s ~= 'running' then return s, 0 end
  redis.call('ZREM', KEYS[2], ARGV[6])
  -- A redelivery counts against the job only when its series were in a forward pass as its worker
  -- died (the worker sets 'in_pass' around each pass): a job that merely waited beside the one that
  -- killed the worker is never failed for it.
  local lost = tonumber(redis.call('HGET', KEYS[1], 'lost') or '0')
  if s == 'running' and redis.call('HGET', KEYS[1], 'in_pass') == '1' then
    lost = lost + 1
    redis.call('HSET', KEYS[1], 'lost', lost)
  end
  redis.call('HDEL', KEYS[1], 'in_pass')
  if lost >= tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'error',
      'its worker was lost ' .. lost .. ' times while it was in a forward pass; not retried again')
    redis.call('DEL', KEYS[3], KEYS[4])
    ended(KEYS[1], ARGV[7] .. redis.call('HGET', KEYS[1], 'owner'), KEYS[5], ARGV[6], 'failed', ARGV[1], ARGV[4], ARGV[5])
    return 'failed', lost
  end
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2], 'progress_done', 0)
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('DEL', KEYS[4])
  return 'running', lost
end
local status, lost = claim()
return {status, lost, redis.call('HGETALL', KEYS[1])}
