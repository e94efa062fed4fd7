-- wrk script for bench/gateway.sh.
--   BENCH_TARGET=HOST:PORT  send absolute-form requests for http://HOST:PORT/ with a matching
--                           Host header (what a client sends to an explicit proxy); unset or
--                           empty: plain origin-form requests (direct).
--   BENCH_AUTH=VALUE        a Proxy-Authorization header (cordon's token).
-- Prints one line at the end:
--   RESULT requests duration_us p50_us p99_us socket_errors non_2xx_3xx
local target = os.getenv("BENCH_TARGET")
local auth = os.getenv("BENCH_AUTH")
if target ~= nil and target ~= "" then
  wrk.path = "http://" .. target .. "/"
  wrk.headers["Host"] = target
end
if auth ~= nil and auth ~= "" then
  wrk.headers["Proxy-Authorization"] = auth
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %.1f %.1f %d %d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
