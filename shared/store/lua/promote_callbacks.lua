-- Moves callbacks due for another attempt back onto the stream.
-- KEYS: the retry set, the callbacks stream   ARGV: now
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('XADD', KEYS[2], '*', 'job', id)
end
return #due
