-- A job whose message could not be sent (its request is answered 503) ends failed, series deleted.
-- It is not deleted: an identical request may have joined it, or an Idempotency-Key replay found it,
-- in the moments before the send failed, and those callers hold its id. Its idempotency key is freed
-- (the client retries with it), and no callback fires (its own request was refused).
-- KEYS: job, owner's in-flight set, model's queued set, job's input list, job's items, callbacks stream,
--       idempotency key or ''
-- ARGV: now, ttl, events channel, job id, error
-- Returns whether it ended it (false: it had moved on meanwhile, e.g. cancelled).
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return false end
redis.call('HDEL', KEYS[1], 'callback_url', 'callback_status')
redis.call('HSET', KEYS[1], 'error', ARGV[5])
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('DEL', KEYS[4], KEYS[5])
if KEYS[7] ~= '' then redis.call('DEL', KEYS[7]) end
ended(KEYS[1], KEYS[2], KEYS[6], ARGV[4], 'failed', ARGV[1], ARGV[2], ARGV[3])
return true
