-- A waiter's answer, prepended to the scripts that give one (shared/store/scripts.py): the job's
-- record as HGETALL gives it, then, once it succeeded, its output list and its items (false before,
-- and for a job that did not succeed: a running job's partial outputs are not read).
local function answer(job, output, items)
  local record = redis.call('HGETALL', job)
  if redis.call('HGET', job, 'status') ~= 'succeeded' then return record, false, false end
  return record, redis.call('LRANGE', output, 0, -1), redis.call('GET', items)
end
