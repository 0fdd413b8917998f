-- A worker stores the outcomes of jobs of one model (with, for a job its last forward pass
-- completed, that pass's results and the job's result cache entry): one script however many jobs.
-- KEYS: callbacks stream, the model's circuit, its outcome buckets of the breaker's window (the
--       current one first), then for each job: its record, its owner's in-flight set, input list,
--       output list, items, result cache output list or '', result cache entry or ''
-- ARGV: now, ttl, breaker min jobs, breaker failure ratio, bucket ttl, cache ttl, the number of
--       outcome buckets, the most results an answer carries, the most bytes it carries, then for
--       each job: its final status, id, the claim's attempt, cache entry value, n (results to append
--       first), the n results, m (twice the fields), then the field/value pairs
-- Only a running job can finish, and only by the claim that holds it (its `attempts` is the
-- caller's: a later delivery's claim supersedes an earlier one, lua/start.lua, whose finish then
-- stores nothing and returns 'superseded'); the first terminal write wins, so a redelivered
-- duplicate cannot overwrite a result, and a job ended meanwhile (cancelled, timed out) gets no more
-- results. A pending cancel request turns success into 'cancelled' and the outcome's fields are not
-- stored.
-- Output and items live as long as the record; a success is cached (shared/cache.py) before it is
-- announced, so a client that repeats the request on seeing the result hits the cache. Returns
-- each job's final status.
-- A job someone waits on is answered on the channel of the API process that waits (its record's
-- `awaited`: lua/create.lua, lua/read.lua), its record and results in the message (lua/answer.lua),
-- when they are at most `the most results` and `the most bytes`: its waiter needs no read of its
-- own (a larger answer is read by its waiter). Every job finished here is also announced by id,
-- with the others the worker finished together (store.finish).
local now, ttl = ARGV[1], ARGV[2]
local min_jobs, failure_ratio, bucket_ttl, cache_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local buckets = tonumber(ARGV[7])
local most_results, most_bytes = tonumber(ARGV[8]), tonumber(ARGV[9])
local answers = {}  -- by answers channel: {id, record, outputs, items} of each awaited job
local circuit, current = KEYS[2], KEYS[3]

-- The circuit breaker (api/breaker.py) counts what the model did, here where every run ends. A closed
-- circuit opens when the window's failures reach the ratio over at least `min jobs`; a half-open one
-- closes at the first success (counting anew) and opens again at the first failure. While open, the
-- outcomes of jobs started before are counted but change nothing. A fine-tuning run's outcome says
-- nothing of how the model serves: it is not counted. The circuit's state is read once a script
-- and again after a change; the successes of a closed circuit are added up and counted at once
-- (before any failure is counted, so its ratio sees them).
local circuit_state = redis.call('HGET', circuit, 'state') or ''
local oks, counted = 0, false
local function add_oks()
  if oks > 0 then redis.call('HINCRBY', current, 'ok', oks) end
  oks = 0
end
local function count(outcome)
  counted = true
  if outcome == 'ok' and circuit_state == '' then
    oks = oks + 1
    return
  end
  add_oks()
  redis.call('HINCRBY', current, outcome, 1)
  if circuit_state == 'half_open' then
    if outcome == 'ok' then
      redis.call('DEL', circuit, unpack(KEYS, 3, 2 + buckets))
    else
      redis.call('HSET', circuit, 'state', 'open', 'opened_at', now, 'probes', 0)
    end
  elseif circuit_state == '' and outcome == 'failed' then
    local ok, failed = 0, 0
    for i = 3, 2 + buckets do
      local counts = redis.call('HMGET', KEYS[i], 'ok', 'failed')
      ok = ok + tonumber(counts[1] or '0')
      failed = failed + tonumber(counts[2] or '0')
    end
    if ok + failed >= min_jobs and failed >= failure_ratio * (ok + failed) then
      redis.call('HSET', circuit, 'state', 'open', 'opened_at', now, 'probes', 0)
    end
  end
  circuit_state = redis.call('HGET', circuit, 'state') or ''
end

-- k: the job's first key; a: its first argument. Returns its final status and its next argument.
local function finish(k, a)
  local job, output = KEYS[k], KEYS[k + 3]
  local n = tonumber(ARGV[a + 4])
  local m = tonumber(ARGV[a + 5 + n])
  local after = a + 6 + n + m
  local state = redis.call('HMGET', job, 'status', 'cancel_requested', 'lane', 'awaited', 'callback_url', 'attempts')
  if not state[1] then return 'missing', after end
  if state[6] ~= ARGV[a + 2] then return 'superseded', after end  -- however the later run ended
  if state[1] ~= 'running' then return state[1], after end
  for i = a + 5, a + 4 + n, 1000 do  -- unpack puts its values on Lua's C stack (8000 slots)
    redis.call('RPUSH', output, unpack(ARGV, i, math.min(i + 999, a + 4 + n)))
  end
  local final = ARGV[a]
  if state[2] == '1' then final = 'cancelled' end
  if final ~= 'cancelled' and m > 0 then redis.call('HSET', job, unpack(ARGV, a + 6 + n, after - 1)) end
  redis.call('HDEL', job, 'in_pass')
  if final == 'succeeded' then
    redis.call('EXPIRE', output, ttl)
    redis.call('EXPIRE', KEYS[k + 4], ttl)
    if KEYS[k + 5] ~= '' then
      redis.call('COPY', output, KEYS[k + 5], 'REPLACE')
      redis.call('EXPIRE', KEYS[k + 5], cache_ttl)
      redis.call('SET', KEYS[k + 6], ARGV[a + 3], 'EX', cache_ttl)
    end
  else
    redis.call('DEL', output)
  end
  redis.call('DEL', KEYS[k + 2])
  if (final == 'succeeded' or final == 'failed') and state[3] ~= 'train' then
    count(final == 'failed' and 'failed' or 'ok')
  end
  ended(job, KEYS[k + 1], KEYS[1], ARGV[a + 1], final, now, ttl, '', state[5] ~= false)
  local waiting = state[4]
  if waiting and (final ~= 'succeeded' or redis.call('LLEN', output) <= most_results) then
    local record, outputs, items = answer(job, output, KEYS[k + 4], final)
    local size = items and #items or 0
    for _, result in ipairs(outputs or {}) do size = size + #result end
    if size <= most_bytes then
      answers[waiting] = answers[waiting] or {}
      table.insert(answers[waiting], {ARGV[a + 1], record, outputs, items})
    end
  end
  return final, after
end

local finals = {}
local a = 10
for k = 3 + buckets, #KEYS, 7 do
  local final
  final, a = finish(k, a)
  finals[#finals + 1] = final
end
add_oks()
if counted then redis.call('EXPIRE', current, bucket_ttl) end
for channel, answered in pairs(answers) do redis.call('PUBLISH', channel, cmsgpack.pack(answered)) end
return finals
