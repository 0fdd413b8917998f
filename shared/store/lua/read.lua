-- A job's record, and with it, once it succeeded, its results: one round trip for a waiter's answer.
-- KEYS: job, job's output list, job's items
-- ARGV: '1' when the reader will wait for the job to end, else '0'
-- Returns {record as HGETALL gives it, the output list or false, the items or false} (lua/answer.lua).
-- A reader that will wait marks a job not yet ended `awaited`: the worker that finishes it sends
-- its answer with the announcement (lua/finish.lua), and the waiter reads nothing more.
if ARGV[1] == '1' then
  local s = redis.call('HGET', KEYS[1], 'status')
  if s == 'queued' or s == 'running' then redis.call('HSET', KEYS[1], 'awaited', '1') end
end
return {answer(KEYS[1], KEYS[2], KEYS[3])}
