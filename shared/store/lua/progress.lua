-- A worker records a running job's progress and announces it (an ended or expired job is left alone).
-- KEYS: job   ARGV: series (or steps) done, events channel, job id[, field, value ...]: more record fields
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'progress_done', ARGV[1], unpack(ARGV, 4))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
