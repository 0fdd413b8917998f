-- A worker records a running job's progress and announces it (an ended or expired job is left alone).
-- KEYS: job   ARGV: series done, events channel, job id
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'progress_done', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
