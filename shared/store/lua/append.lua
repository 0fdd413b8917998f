-- A worker stores a forward pass's results of a job the pass did not finish (lua/finish.lua ends
-- those it did), when its claim still holds the job: a later delivery's claim supersedes it
-- (lua/start.lua restarts the job, its output cleared), and results of the earlier run must not
-- join the later run's. A job ended meanwhile (cancelled, failed, expired) gets none either.
-- KEYS: job, output list
-- ARGV: the claim's attempt, ttl, '1' on the job's last append of the round trip (clears its
--       `in_pass` mark, then records its progress), the series done or '' (none recorded), events
--       channel, job id, the first series of the pass (its mark: lua/read_pass.lua), the output's
--       length before these results, then the results
-- Returns 1, or 0 when nothing was stored.
-- Only the pass's own mark is cleared: the job's next pass may have been marked already (the
-- worker stores a pass's results on its I/O thread while the next pass starts). Results go where
-- the output's length says they belong, once: redis-py sends a round trip again when its
-- connection drops before the replies, and the second sending must not append them twice.
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'in_pass')
if state[1] ~= 'running' or state[2] ~= ARGV[1] then return 0 end
if #ARGV >= 9 and redis.call('LLEN', KEYS[2]) == tonumber(ARGV[8]) then
  for i = 9, #ARGV, 1000 do  -- unpack puts its values on Lua's C stack (8000 slots)
    redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  -- The record's lifetime, which `finish` sets for the output too: until then a job's output must
  -- not outlive it.
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
if ARGV[3] == '1' then
  if state[3] == ARGV[7] then redis.call('HDEL', KEYS[1], 'in_pass') end
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[1], 'progress_done', ARGV[4])
    redis.call('PUBLISH', ARGV[5], ARGV[6])
  end
end
return 1
