-- wrk script: POST JSON bodies drawn from a file of real texts, report latency as JSON.
--
--   wrk -t1 -c64 -d10s -s bench/post.lua URL -- BODIES_FILE
--
-- BODIES_FILE holds one complete JSON request body per line (written by bench/texts.py).
-- Each connection walks the bodies round-robin from its own offset. done() prints one line
-- "WRK_JSON {...}" with the run's counters and wrk's latency distribution (microseconds).

local counter = 1
local requests = {}
local thread_index = 0

function setup(thread)
   thread:set("thread_index", thread_index)
   thread_index = thread_index + 1
end

function init(args)
   local path = args[1]
   if path == nil then
      error("post.lua: pass the bodies file after --")
   end
   local headers = { ["Content-Type"] = "application/json" }
   for line in io.lines(path) do
      if #line > 0 then
         requests[#requests + 1] = wrk.format("POST", wrk.path, headers, line)
      end
   end
   if #requests == 0 then
      error("post.lua: " .. path .. " holds no bodies")
   end
   counter = ((thread_index or 0) * 7919) % #requests + 1
end

function request()
   local r = requests[counter]
   counter = counter % #requests + 1
   return r
end

function done(summary, latency, _)
   local e = summary.errors
   local p = function(q) return latency:percentile(q) end
   io.write(string.format(
      'WRK_JSON {"duration_us": %d, "requests": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"min": %d, "mean": %.1f, "stdev": %.1f, "max": %d, ' ..
      '"p50": %d, "p90": %d, "p99": %d, "p999": %d}}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.stdev, latency.max,
      p(50.0), p(90.0), p(99.0), p(99.9)))
end
