-- wrk script: replay a corpus of signed, gzipped Catena webhooks written by
--   catena-ingest send --count N --wrk-corpus FILE
-- and drive the relay with the same load generator the ceiling tool uses:
--   CORPUS=FILE wrk -t1 -c256 -d30s -s scripts/wrk-corpus.lua http://127.0.0.1:8080
-- Every request is sent once (thread t of WRK_THREADS sends requests t, t+T, ...). The
-- signatures carry the corpus' creation time, so replay it within the relay's 5-minute window.
-- A thread that runs out of requests repeats its last one (the pipeline drops it as a
-- duplicate) and says so at the end: size the corpus to rate x duration.

--
-- RATE=N (requests per second over all threads) paces the run: request k of a thread is
-- scheduled at start + k / (N / WRK_THREADS), so give wrk enough connections (-c) that one is
-- always free. Without RATE every connection sends as soon as it has its answer (saturation).

local threads = {}
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

setup = function(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

init = function(args)
  local path = assert(os.getenv("CORPUS"), "set CORPUS to a corpus file")
  local nthreads = tonumber(os.getenv("WRK_THREADS") or "1")
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  requests = {}
  local pos, i = 1, 0
  while pos <= #data do
    local nl = data:find("\n", pos, true)
    local len = tonumber(data:sub(pos, nl - 1))
    if i % nthreads == id - 1 then
      requests[#requests + 1] = data:sub(nl + 1, nl + len)
    end
    i = i + 1
    pos = nl + 1 + len
  end
  data = nil
  index = 0
  exhausted = 0
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
  index = index + 1
  if index > #requests then
    exhausted = exhausted + 1
    return requests[#requests]
  end
  return requests[index]
end

done = function(summary, latency, requests)
  local repeated = 0
  for _, t in ipairs(threads) do
    repeated = repeated + (t:get("exhausted") or 0)
  end
  local seconds = summary.duration / 1e6
  local refused = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    '{"requests": %d, "seconds": %.2f, "requests_per_second": %.0f, "not_accepted": %d, ' ..
    '"repeated": %d, "p50_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f}\n',
    summary.requests, seconds, summary.requests / seconds, refused, repeated,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
  if repeated > 0 then
    io.stderr:write(string.format("corpus exhausted: %d repeated requests (duplicates)\n", repeated))
  end
end
