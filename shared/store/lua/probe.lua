-- An API process asks to send a probe call to a model whose circuit is not closed (api/breaker.py).
-- KEYS: the model's circuit   ARGV: now, cool-off seconds, probes at a time
-- Returns 1 when the call may go (the circuit closed meanwhile, or a probe place was free), else 0.
-- An open circuit turns half-open once its cool-off has passed; a half-open one lets `probes` calls
-- through, and after another cool-off without an outcome (probes lost) lets the next ones through.
local c = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'probes')
if not c[1] then return 1 end
local now, cooloff = tonumber(ARGV[1]), tonumber(ARGV[2])
local elapsed = now - tonumber(c[2] or '0') >= cooloff
if c[1] == 'open' then
  if not elapsed then return 0 end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'opened_at', ARGV[1], 'probes', 1)
  return 1
end
if tonumber(c[3] or '0') < tonumber(ARGV[3]) then
  redis.call('HINCRBY', KEYS[1], 'probes', 1)
  return 1
end
if elapsed then
  redis.call('HSET', KEYS[1], 'opened_at', ARGV[1], 'probes', 1)
  return 1
end
return 0
