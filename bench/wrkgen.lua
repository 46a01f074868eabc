-- wrk script for bench/wrkgen.py: sends pre-built requests, each exactly once.
--
-- Arguments (after wrk's "--"): DIR RATE KEEP
--   DIR   holds requests.<n> for wrk thread n: records "<length>\n<bytes>", written by
--         bench/wrkgen.py before the measured window;
--   RATE  requests/s for this thread (0: as fast as the connections go, closed loop;
--         otherwise each request is paced to its slot on a fixed schedule);
--   KEEP  "1": keep the bodies of 200 answers, written to bodies.<n> once the thread is done.
-- When a thread has had an answer to every one of its requests it prints "done <n>" and
-- stops; its done() line reports the window (monotonic seconds) and the thread's CPU time.

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } wrkgen_timespec;
int clock_gettime(int clock, wrkgen_timespec *t);
]]
local ts = ffi.new("wrkgen_timespec")
local function clock(which)  -- 1: CLOCK_MONOTONIC, 3: CLOCK_THREAD_CPUTIME_ID
  ffi.C.clock_gettime(which, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local requests, dir, rate, keep = {}, nil, 0, false
local claimed, issued, completions, connections = 0, 0, 0, 0
local bodies, ok, refused = {}, 0, 0
started, ended, cpu_start, cpu_end, sent, answered = 0, 0, 0, 0, 0, 0

function init(args)
  dir, rate, keep = args[1], tonumber(args[2]), args[3] == "1"
  local f = assert(io.open(dir .. "/requests." .. id, "rb"))
  local data = f:read("*a")
  f:close()
  local pos = 1
  while pos <= #data do
    local nl = data:find("\n", pos, true)
    local length = tonumber(data:sub(pos, nl - 1))
    table.insert(requests, data:sub(nl + 1, nl + length))
    pos = nl + 1 + length
  end
  connections = tonumber(args[4])
  if not keep then
    response = nil  -- wrk then skips parsing headers and bodies
  end
end

local function finish()
  ended, cpu_end, answered = clock(1), clock(3), completions
  if keep then
    local f = assert(io.open(dir .. "/bodies." .. id, "wb"))
    for _, body in ipairs(bodies) do
      f:write(#body, "\n", body)
    end
    f:close()
  end
  io.write("done ", id, "\n")
  io.stdout:flush()
  wrk.thread:stop()
end

-- wrk calls delay() before every request: once per connection at the start, then after
-- each answer on that connection. So completions = calls - connections.
local calls = 0
function delay()
  calls = calls + 1
  if calls > connections then
    completions = completions + 1
    if completions == #requests then
      finish()
      return 3600000
    end
  end
  if claimed >= #requests then
    return 3600000  -- nothing left for this connection: it stays idle until the end
  end
  claimed = claimed + 1
  if started == 0 then
    started, cpu_start = clock(1), clock(3)
  end
  if rate > 0 then
    local due = started + (claimed - 1) / rate
    local wait = (due - clock(1)) * 1000
    if wait > 0 then
      return wait
    end
  end
  return 0
end

function request()
  if claimed == 0 then
    return requests[1]  -- wrk's start-up check of the script (pipelining), never sent
  end
  issued = issued + 1
  -- Only a connection the relay closed mid-request asks without a delay() claim: the run
  -- would then send a request twice or lose one, so it stops here instead.
  assert(issued <= claimed, "wrkgen: a connection closed with a request in flight")
  sent = issued
  return requests[issued]
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
    table.insert(bodies, body)
  else
    refused = refused + 1
  end
end

function done(summary, latency, _)
  local parts = {}
  for _, p in ipairs({50, 99, 99.9}) do
    table.insert(parts, string.format("%g=%d", p, latency:percentile(p)))
  end
  for _, thread in ipairs(threads) do
    io.write(string.format("thread %d started=%.6f ended=%.6f cpu=%.6f sent=%d answered=%d\n", thread:get("id"),
      thread:get("started"), thread:get("ended"), thread:get("cpu_end") - thread:get("cpu_start"),
      thread:get("sent"), thread:get("answered")))
  end
  io.write(string.format("summary requests=%d status_errors=%d timeouts=%d socket_errors=%d %s\n",
    summary.requests, summary.errors.status, summary.errors.timeout,
    summary.errors.connect + summary.errors.read + summary.errors.write, table.concat(parts, " ")))
end
