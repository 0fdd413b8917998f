-- The one terminal-state write, prepended to every script that ends a job (shared/store/scripts.py).
-- The job's state and end time, its lifetime from now on, out of its owner's in-flight set, announced
-- to long-waiting clients, and onto the callbacks stream when it asked for a callback: all in the
-- script that ends it, so no ended job misses its wake-up or its callback. (A worker finishing many
-- jobs at once passes no channel and announces them in one message after the scripts: store.finish.)
-- `callback`: whether the job has a callback_url, when the caller read it already (else looked up).
local function ended(job, inflight, callbacks, id, status, now, ttl, channel, callback)
  redis.call('HSET', job, 'status', status, 'finished_at', now)
  redis.call('EXPIRE', job, ttl)
  redis.call('ZREM', inflight, id)
  if channel ~= '' then redis.call('PUBLISH', channel, id) end
  if callback == nil then callback = redis.call('HEXISTS', job, 'callback_url') == 1 end
  if callback then
    redis.call('XADD', callbacks, 'MAXLEN', '~', '1000000', '*', 'job', id)
  end
end
