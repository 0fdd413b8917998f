"""Single-flight: while a job for a request is queued or running, the same owner's identical
request attaches to it instead of queueing another, so a client that retries after a timeout
waits on its first job.

Only for requests whose answer does not depend on which job computes it: those the result
cache may answer (the family's `cacheable`: deterministic models, T5 with a seed). Requests
with an Idempotency-Key follow the key instead, and requests with a callback_url are never
joined (each asked for its own delivery).

The entry (`keys.flight`) names the job and counts only while that job is queued or running,
read from the job's record at the moment of joining; so nothing has to remove it when the job
ends, and it expires with the record.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from shared import keys

# KEYS[1] flight entry  ARGV: the new job's id, ttl, the job key prefix (keys.job('')).
# Returns the id of the job still queued or running that the entry names (nothing is written),
# else records the new job and returns nil.
JOIN = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then
  local s = redis.call('HGET', ARGV[3] .. held, 'status')
  if s == 'queued' or s == 'running' then return held end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""


class Flights:
    def __init__(self, client: aioredis.Redis):
        self._join = client.register_script(JOIN)

    async def join(self, owner: str, digest: str, job_id: str, ttl_s: int) -> str | None:
        """The owner's job in flight for the request `digest`, if any; else `job_id` becomes it."""
        return await self._join(keys=[keys.flight(owner, digest)], args=[job_id, ttl_s, keys.job("")])
