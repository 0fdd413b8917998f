-- A training worker records a running fine-tuning job's step and announces it, while the claim it
-- runs for holds the job (its `attempts`, lua/append.lua); an ended or expired job is left alone.
-- A forecast's progress travels with its pass's results (lua/append.lua).
-- KEYS: job   ARGV: steps done, events channel, job id, the claim's attempt[, field, value ...]: more
--       record fields
-- Returns 1, or 0 when nothing was recorded (the run is to stop).
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts')
if state[1] ~= 'running' or state[2] ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], 'progress_done', ARGV[1], unpack(ARGV, 5))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
