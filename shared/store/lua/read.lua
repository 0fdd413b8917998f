-- A job's record, and with it, once it succeeded, its results: one round trip for a waiter's answer.
-- KEYS: job, job's output list, job's items
-- ARGV: the owner who will wait for the job to end and the answers channel of its API process, or
--       '' and '' (a read that will not wait)
-- Returns {record as HGETALL gives it, the output list or false, the items or false} (lua/answer.lua).
-- A reader that will wait marks its own job, not yet ended, `awaited` with its channel: the worker
-- that finishes it sends the answer there (lua/finish.lua), and the waiter reads nothing more. The
-- first mark stays (another process's waiter is woken by the job's id and reads it), and a mark
-- never fails the read (a Redis out of memory refuses writes, not reads).
local state = redis.call('HMGET', KEYS[1], 'status', 'awaited', 'owner')
if ARGV[1] ~= '' and (state[1] == 'queued' or state[1] == 'running') and not state[2] and state[3] == ARGV[1] then
  redis.pcall('HSET', KEYS[1], 'awaited', ARGV[2])
end
return {answer(KEYS[1], KEYS[2], KEYS[3], state[1])}
