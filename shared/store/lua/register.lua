-- A training worker registers the model a fine-tuning job made, while the claim it ran for holds
-- the job (its `attempts`, lua/append.lua): checked and written in one step, so a later delivery's
-- claim landing between a check and the write cannot leave the superseded run's model registered.
-- KEYS: job, fine-tuned models   ARGV: the claim's attempt, model id, manifest (JSON)
-- Returns 1, or 0 when nothing was registered (the run no longer holds the job).
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts')
if state[1] ~= 'running' or state[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
