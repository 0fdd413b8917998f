-- A waiter's answer, prepended to the scripts that give one (shared/store/scripts.py): the job's
-- record as HGETALL gives it, then, once it succeeded, its output list and its items (false before,
-- and for a job that did not succeed: a running job's partial outputs are not read).
-- `status`: the job's, as the caller knows it.
local function answer(job, output, items, status)
  local record = redis.call('HGETALL', job)
  if status ~= 'succeeded' then return record, false, false end
  return record, redis.call('LRANGE', output, 0, -1), redis.call('GET', items)
end
