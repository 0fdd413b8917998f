-- A worker reads a forward pass's jobs: their pending cancels and series, and marks them `in_pass`.
-- KEYS: for each job of the pass: its record, its input list
-- ARGV: '1' to mark the jobs `in_pass` (lua/start.lua counts a death against them), '0' not to, or
--       'mark' to mark them and read nothing; then for each job: the first and last of its series to
--       read (last below first: none; absent with 'mark'), and the attempt of the claim the pass
--       runs it for; with 'mark', the first of its series in the pass and that attempt
-- Returns, for each job, {'1' when a cancel is pending or false, its series or false} (nothing
-- with 'mark'). Only the claim that holds the job marks it (its `attempts`, lua/append.lua): a run
-- a later delivery took over leaves the mark to that run. A record gone (expired, deleted) is not
-- marked: the mark would make a record of one field that never expires. The mark's value is the
-- first series of the pass: the store of the job's previous pass, which may run meanwhile on the
-- worker's I/O thread, clears only its own pass's mark (lua/append.lua).
local function mark(job, attempt, first)
  if redis.call('HGET', job, 'attempts') == attempt then redis.call('HSET', job, 'in_pass', first) end
end
local out = {}
if ARGV[1] == 'mark' then
  for i = 1, #KEYS, 2 do mark(KEYS[i], ARGV[i + 2], ARGV[i + 1]) end
  return out
end
for i = 1, #KEYS, 2 do
  local at = 2 + 3 * (i - 1) / 2
  local job = KEYS[i]
  local series = false
  if tonumber(ARGV[at + 1]) >= tonumber(ARGV[at]) then
    series = redis.call('LRANGE', KEYS[i + 1], ARGV[at], ARGV[at + 1])
  end
  out[#out + 1] = {redis.call('HGET', job, 'cancel_requested') or false, series}
  if ARGV[1] == '1' then mark(job, ARGV[at + 2], ARGV[at]) end
end
return out
