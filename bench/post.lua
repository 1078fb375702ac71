-- wrk script of the benchmark: POST an OpenAI-shaped chat request, print a JSON summary.
--
-- Environment:
--   BENCH_WORKLOAD  json | stream | paced   (the bodies match bench/app.py REQUEST_BODIES)
--   BENCH_TEAMS     spread requests over the keys k-0 .. k-(N-1) (default 1: always k-0)
--
-- With one team the request is static (wrk builds it once); with several, every request is
-- pre-formatted in init() so that the Lua cost per request stays a table lookup.

local messages = '[{"role": "system", "content": "You are a terse assistant."}, '
    .. '{"role": "user", "content": "Say hello to the benchmark in a few words."}]'
local bodies = {
  json = '{"model": "gpt-bench", "messages": ' .. messages .. '}',
  stream = '{"model": "gpt-bench", "stream": true, "messages": ' .. messages .. '}',
  paced = '{"model": "gpt-bench", "stream": true, "pace_ms": 5, "messages": ' .. messages .. '}',
}

local workload = os.getenv("BENCH_WORKLOAD") or "json"
local teams = tonumber(os.getenv("BENCH_TEAMS") or "1")

wrk.method = "POST"
wrk.body = bodies[workload]
assert(wrk.body, "unknown BENCH_WORKLOAD " .. workload)
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer k-0"

if teams > 1 then
  local prepared = {}
  local n = 0

  init = function(args)
    for i = 0, teams - 1 do
      wrk.headers["Authorization"] = "Bearer k-" .. i
      prepared[i] = wrk.format()
    end
  end

  request = function()
    local r = prepared[n]
    n = (n + 1) % teams
    return r
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
