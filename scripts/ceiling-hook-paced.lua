-- wrk script for the ceiling tool's HTTP front (`ceiling pipeline --http`), as its own
-- scripts/hook.lua (the same ~1 KB body, a unique event id per request), paced like
-- scripts/wrk-corpus.lua so the ceiling and catena-ingest run at the same fixed rate in one
-- `scripts/bench.sh` run, and ending with the same JSON summary line `catena-ingest bench
-- measure --wrk` reads.
--
--   RATE=N wrk -t1 -c256 -d20s -s scripts/ceiling-hook-paced.lua http://127.0.0.1:18088/hook
--
-- Request k of a thread is scheduled at start + k / (N / WRK_THREADS); RATE=0 (or unset) sends
-- as fast as the connections allow.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } wrk_timespec;
  int clock_gettime(int clock_id, wrk_timespec *tp);
]]
local ts = ffi.new("wrk_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local counter = 0
local tid = 0
local threads = 0
local pad = string.rep("x", 860)

setup = function(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

init = function(args)
  math.randomseed(os.time() + tid * 7919)
  local nthreads = tonumber(os.getenv("WRK_THREADS") or "1")
  local rate = tonumber(os.getenv("RATE") or "0")
  interval_ms = rate > 0 and (1000 * nthreads / rate) or 0
  scheduled = 0
  started_ms = nil
end

delay = function()
  if interval_ms == 0 then
    return 0
  end
  local now = now_ms()
  started_ms = started_ms or now
  local slot = started_ms + scheduled * interval_ms
  scheduled = scheduled + 1
  return slot > now and (slot - now) or 0
end

request = function()
  counter = counter + 1
  local id = string.format("evt_%d_%d_%d", tid, os.time(), counter)
  local body = '{"id":"' .. id .. '","type":"invoice.payment_succeeded","entity":"acct_' ..
    math.random(0, 99999) .. '","created":1700000000,"data":{"object":{"amount":4200,"currency":"eur","pad":"' .. pad .. '"}}}'
  return wrk.format("POST", "/hook", {["Content-Type"] = "application/json"}, body)
end

done = function(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local refused = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    '{"requests": %d, "seconds": %.2f, "requests_per_second": %.0f, "not_accepted": %d, ' ..
    '"repeated": 0, "p50_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f}\n',
    summary.requests, seconds, summary.requests / seconds, refused,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
