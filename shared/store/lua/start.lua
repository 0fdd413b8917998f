-- A worker claims the jobs of one delivery of a message.
-- KEYS: model's queued set, callbacks stream, then for each job: its record, input list, output list
-- ARGV: now, worker name, max deliveries, ttl, events channel, the owners' in-flight set prefix
--       (keys.in_flight without the owner), the most series of a sync job to read with its claim
--       (0: none), then the job ids (one per job, in KEYS' order)
-- Returns, for each job, {the status afterwards, the record as HGETALL gives it, its series or
-- false}: one command claims a message's jobs and reads them. Anything but 'running' tells the
-- worker to skip the job (cancelled, finished, expired: 'missing', with an empty record). A worker
-- with nothing under way or waiting asks for a small sync job's series (up to the most given), and
-- the job is marked `in_pass` here: it goes into a pass at once, which then needs no round trip of
-- its own (workers/executor.py). The record's `lost` counts the deliveries whose worker died while
-- the job was in a forward pass, this one's predecessor included: a job lost before runs alone. A
-- redelivered job starts over: its partial output is cleared, and its `attempts` + 1 fences the
-- claim before (a holder taken for dead may still run): only the claim holding the job appends and
-- finishes (lua/append.lua, lua/finish.lua). A job whose worker died `max deliveries` times while
-- it was in a forward pass ends 'failed' instead of killing worker after worker. A job's owner's
-- in-flight set is the one key not in KEYS: whose it is, the record says.
local function claim(job, input, output, id)
  local state = redis.call('HMGET', job, 'status', 'lost', 'in_pass', 'attempts', 'lane', 'n_series', 'worker',
    'started_at')
  local s = state[1]
  if not s then return 'missing' end
  if s ~= 'queued' and s ~= 'running' then return s end
  redis.call('ZREM', KEYS[1], id)
  -- A redelivery counts against the job only when its series were in a forward pass as its worker
  -- died (the worker sets 'in_pass' around each pass): a job that merely waited beside the one that
  -- killed the worker is never failed for it. This very claim sent again (redis-py resends a round
  -- trip whose connection dropped before its reply: same worker, same `now`) is no death. A worker
  -- restarted under its old name (a container's PID 1) claims at another time, and counts.
  local lost = tonumber(state[2] or '0')
  if state[3] then
    if s == 'running' and not (state[7] == ARGV[2] and state[8] == ARGV[1]) then
      lost = lost + 1
      redis.call('HSET', job, 'lost', lost)
    end
    redis.call('HDEL', job, 'in_pass')
  end
  if lost >= tonumber(ARGV[3]) then
    redis.call('HSET', job, 'error',
      'its worker was lost ' .. lost .. ' times while it was in a forward pass; not retried again')
    redis.call('DEL', input, output)
    ended(job, ARGV[6] .. redis.call('HGET', job, 'owner'), KEYS[2], id, 'failed', ARGV[1], ARGV[4], ARGV[5])
    return 'failed', false
  end
  local attempts = tonumber(state[4] or '0') + 1
  local read = state[5] == 'sync' and tonumber(state[6] or '0') <= tonumber(ARGV[7])
  redis.call('HSET', job, 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2], 'progress_done', 0,
    'attempts', attempts)
  if read then redis.call('HSET', job, 'in_pass', '0') end  -- its one pass, from its first series
  if s == 'running' then redis.call('DEL', output) end  -- a queued job has written no output yet
  return 'running', read and redis.call('LRANGE', input, 0, -1)
end
local claimed = {}
for i = 8, #ARGV do
  local at = 3 + 3 * (i - 8)
  local job = KEYS[at]
  local status, series = claim(job, KEYS[at + 1], KEYS[at + 2], ARGV[i])
  claimed[#claimed + 1] = {status, redis.call('HGETALL', job), series or false}
end
return claimed
