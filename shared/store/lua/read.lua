-- A job's record, and with it, once it succeeded, its results: one round trip for a waiter's answer.
-- KEYS: job, job's output list, job's items
-- ARGV: the owner who will wait for the job to end, or '' (a read that will not wait)
-- Returns {record as HGETALL gives it, the output list or false, the items or false} (lua/answer.lua).
-- A reader that will wait marks its own job, not yet ended, `awaited`: the worker that finishes it
-- sends its answer with the announcement (lua/finish.lua), and the waiter reads nothing more. The
-- mark is written once, and never fails the read (a Redis out of memory refuses writes, not reads).
local state = redis.call('HMGET', KEYS[1], 'status', 'awaited', 'owner')
if ARGV[1] ~= '' and (state[1] == 'queued' or state[1] == 'running') and not state[2] and state[3] == ARGV[1] then
  redis.pcall('HSET', KEYS[1], 'awaited', '1')
end
return {answer(KEYS[1], KEYS[2], KEYS[3], state[1])}
