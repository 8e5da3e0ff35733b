-- wrk script: each request carries the next token of a file as "Authorization: Bearer TOKEN".
--
--   wrk -s tokens.lua URL -- TOKENS_FILE THREADS [START]
--
-- TOKENS_FILE holds one token a line (one line: the same token on every request); "-" sends
-- no Authorization header at all (an app's own call through an egress route). THREADS is
-- wrk's -t, so each thread starts at its own offset in the list, plus START (default 0: a
-- run that continues where the last one stopped). The requests are formatted
-- once, in init(), so a request costs wrk one table lookup whatever the token.
-- done() prints one machine-readable line for run.sh:
--   BENCH requests=N duration_us=N connect=N read=N write=N status=N timeout=N
-- where status counts responses with a status of 400 or more (wrk does not count 3xx, which
-- run.sh rules out by checking each variant once with curl: 200 and the file).

local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
end

function init(args)
   local path = args[1] or error("usage: wrk -s tokens.lua URL -- TOKENS_FILE THREADS")
   local threads = tonumber(args[2] or "1")
   requests = {}
   if path == "-" then requests[1] = wrk.format("GET", nil, {}) end
   for line in (path == "-" and function() return nil end or io.lines(path)) do
      if #line > 0 then
         requests[#requests + 1] = wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. line })
      end
   end
   count = #requests
   if count == 0 then error(path .. ": no tokens") end
   -- Thread k starts k/THREADS of the way through the list (0-based index into requests).
   local start = tonumber(args[3] or "0")
   index = (math.floor(id * count / threads) + start) % count
end

function request()
   index = index + 1
   if index > count then index = 1 end
   return requests[index]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format("BENCH requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
end
