-- Single-flight (api/flight.py): the owner's job still queued or running for the same request, else
-- the new job becomes it.
-- KEYS: the flight entry   ARGV: the new job's id, ttl, the job key prefix
-- The held job's record is the one key not in KEYS: which job it is is known only here. Returns the
-- id of the job the entry names while it is queued or running (nothing is written), else records the
-- new job and returns nil.
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then
  local s = redis.call('HGET', ARGV[3] .. held, 'status')
  if s == 'queued' or s == 'running' then return held end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
