-- wrk script: request I carries "Authorization: Bearer kI", I cycling through 1..N from a
-- start offset: N distinct rate-limit keys (the bench keys a zone by this header).
--
--   wrk -s keys.lua URL -- N START
--
-- done() prints the same BENCH line as tokens.lua.

function init(args)
   count = tonumber(args[1] or error("usage: wrk -s keys.lua URL -- N START"))
   index = tonumber(args[2] or "0") % count
end

function request()
   index = index + 1
   if index > count then index = 1 end
   return wrk.format("GET", nil, { ["Authorization"] = "Bearer k" .. index })
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format("BENCH requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
end
