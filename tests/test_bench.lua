-- make bench's harness (tests/bench/bench.lua with its load generator and
-- loopback floor): a small row runs end to end and prints what it measured,
-- and a bench that cannot start callagent fails fast, saying why. No speed
-- is asserted here: that is what `make bench` itself is for.
local T = require "testing"

local function bench(env)
  env.BENCH_BIN = T.bin
  env.BENCH_PIN = "0"
  env.BENCH_FLOOR_SECONDS = "0.1" -- the floor keeps both cores busy: briefly, here
  env.BENCH_CHURN_SECONDS = env.BENCH_CHURN_SECONDS or "0"
  local p = T.spawn_app(T.root .. "/tests/bench/bench.lua", nil, { env = env })
  local code = p:wait(150000)
  return p, code
end

-- The verdicts at the end follow the numbers they print: "met" exactly when
-- the value is within the target.
local function check_targets(out, ms)
  local block = out:match("\nAgainst the targets %(issue 6%), on this run's rows:\n(.-)\n\n")
    or out:match("\nAgainst the targets %(issue 6%), on this run's rows:\n(.*)$")
  T.ok(block, "the targets block")
  block = block or ""
  local function verdict(what)
    local l = block:match("%- " .. what .. ": ([^\n]*)")
    T.ok(l, "a line for: " .. what)
    return l or "", l and l:match(" %- (m%a+)$")
  end
  local cpu, v = verdict("CPU ≤ 0%.05 s per call%-minute, pcmu, 2 calls")
  local x = tonumber(cpu:match("^([%d.]+)"))
  T.ok((x and v == (x <= 0.05 and "met" or "missed")) or cpu:match("^not measured %(the pcmu rows used no CPU"),
    "CPU: " .. cpu)
  local ratio
  ratio, v = verdict("pcm CPU ≤ 1%.5× pcmu, 2 calls")
  x = tonumber(ratio:match("^([%d.]+)×"))
  T.ok((x and v == (x <= 1.5 and "met" or "missed")) or ratio:match("^not measured %(the pcmu rows used no CPU"),
    "pcm against pcmu: " .. ratio)
  for _, mode in ipairs({ "pcmu", "pcm" }) do
    local l
    l, v = verdict("p99 < 5 ms in / out, nothing lost, the load generator keeping up, " .. mode .. ", 2 calls")
    local a, b = l:match("^([%d.]+) / ([%d.]+) ms")
    a, b = tonumber(a), tonumber(b)
    local whole = not l:match("lost") and not l:match("harness%-limited")
    T.ok(a and v == ((a < 5 and b < 5 and whole) and "met" or "missed"), mode .. " latency: " .. l)
    l = verdict("p99 < 20 ms in / out, nothing lost, the load generator keeping up, " .. mode .. ", 3 calls")
    T.eq(l, "not measured (no " .. mode .. " row of 3 calls)", mode .. ": a size the run has no row of")
    l, v = verdict("≤ 40 KiB RSS per call, " .. mode)
    x = tonumber(l:match("^(%-?[%d.]+) KiB %(the slope%)"))
    T.ok((x and v == (x <= 40 and "met" or "missed")) or l:match("^not measured %(no slope"), mode .. " RSS: " .. l)
  end
  local st
  st, v = verdict("start%-up < 100 ms")
  T.eq(tonumber(st:match("^(%d+) ms %(min of 5%)")), ms, "start-up: the minimum printed above")
  T.eq(v, ms < 100 and "met" or "missed", "start-up: " .. st)
end

T.test("small rows of calls run end to end in both output modes, nothing lost", function()
  local p, code = bench({ BENCH_N = "2,4", BENCH_SECONDS = "1", BENCH_MODES = "audio/pcmu,audio/pcm",
    BENCH_TARGET_CALLS = "2,3", BENCH_WARMUP_SECONDS = "0.5" })
  local out = p:text()
  T.diag(out)
  T.eq(code, 0, "exit status; stderr: " .. p:errtext())
  T.match(out, "\n1 s measured per row after a 0%.5 s warm%-up; ", "the header says the warm-up it had")
  T.match(out, "kernel floor %(200 connections%): [%d.]+ µs CPU per loopback")
  local ms = tonumber(out:match("start%-up %(spawn to serving%): min (%d+) ms"))
  T.ok(ms and ms > 0, "start-up time printed")
  for _, mode in ipairs({ "pcmu", "pcm" }) do
    -- The rows the load generator kept its schedule in (on a machine busy
    -- with other tests it may not): the slope and set-up are over those.
    local kept = {}
    for _, n in ipairs({ 2, 4 }) do
      local what = mode .. ", " .. n .. " calls"
      local ok_, failed, frames, lost_in, lost_out =
        out:match("\n| " .. mode .. " | " .. n .. " | (%d+)/(%d+) | (%d+) | (%d+)/(%d+) |")
      T.eq({ ok_, failed, lost_in, lost_out }, { tostring(n), "0", "0", "0" }, what .. ": set up, none failed, none lost")
      -- 1 s measured (after 0.5 s of warm-up): 50 frames a second per call.
      T.ge(tonumber(frames) or 0, n * 40, what .. ": frames measured")
      local busy, slow = out:match("\n| " .. mode .. " | " .. n .. " |[^\n]* | [%d.]+ | (%d+)%% %((%d+)%%%) |")
      T.ok(busy and tonumber(busy) <= 100 and tonumber(slow) <= 100, what .. ": the loop's busy share, from /healthz")
      if not out:match("\n| " .. mode .. " | " .. n .. " |[^\n]*harness%-limited") then
        kept[#kept + 1] = n
      end
    end
    T.diag(string.format("%s: rows the harness kept up with: %s", mode, table.concat(kept, ", ")))
    local slope = "RSS slope %(audio/" .. mode .. "%): %-?[%d.]+ KiB per call"
    local setup = "set%-up %(audio/" .. mode .. "%): callagent CPU per call created[^\n]*:"
    for i, n in ipairs(kept) do
      setup = setup .. (i > 1 and "," or "") .. " [%d.]+ ms at " .. n
        .. " %([%d.]+ s; p99 [%d.]+ / [%d.]+ ms, max [%d.]+; first 0%.5 s in: p99 [%d.]+, max [%d.]+%)"
    end
    if #kept == 2 then
      T.match(out, slope, mode .. ": the slope over the rows")
    else
      T.no_match(out, slope, mode .. ": no slope over fewer than two rows")
    end
    if #kept > 0 then
      T.match(out .. "\n", setup .. "\n", mode .. ": set-up's CPU per call, for each row kept up with")
    else
      T.no_match(out, "set%-up %(audio/" .. mode .. "%)", mode .. ": no set-up line without a row kept up with")
    end
  end
  check_targets(out, ms)
end, { timeout = 180000 })

T.test("calls that come and go: each ends as real calls do, and nothing of it is left behind", function()
  local p, code = bench({ BENCH_N = "", BENCH_MODES = "audio/pcmu", BENCH_CHURN_SECONDS = "3", BENCH_CHURN_CALLS = "6",
    BENCH_CHURN_LIFE = "1" })
  local out = p:text()
  T.diag(out)
  T.eq(code, 0, "exit status; stderr: " .. p:errtext())
  T.match(out, "Calls that come and go %(pcmu%): 6 at once, each ended 1 s after its stream opened")
  local row = out:match("\n(| %d+ %(%d+%) |[^\n]*)")
  T.ok(row, "the churn row")
  local ended, measured = row:match("^| (%d+) %((%d+)%) |")
  ended, measured = tonumber(ended), tonumber(measured)
  -- 6 calls of about 1 s each: the first 6 end in the warm-up, more in 3 s.
  T.ge(ended, 12, "calls ended")
  T.gt(measured, 0, "calls ended while measured")
  T.match(row, "| [%d.]+ ms | [%d.]+ | %d+%% %(%d+%%%) |", "CPU per call, cores and the loop's load")
  T.match(row, "| [%d.]+ → [%d.]+ MiB %([+-][%d.]+ KiB%) |", "RSS over the window and its slope")
  T.match(row, "| 0, 0 |", "no live call, nor an ended one's connection, left after the last one ended")
  -- Every call created has its final record: completed with the model's
  -- report (the odd calls), or hung up by the callee (the even ones).
  local reported, hung_up, created = row:match("| (%d+) %+ (%d+) of (%d+) |")
  reported, hung_up, created = tonumber(reported), tonumber(hung_up), tonumber(created)
  T.eq(reported + hung_up, created, "every record completed, with the report or hung up by the callee")
  T.ge(created, ended, "a record for every call ended")
  T.ge(reported, 6, "ended by the agent")
  T.ge(hung_up, 6, "ended by the callee")
  -- Each call's end notified to the hooks URL, once.
  -- (A row the load generator fell behind on ends with a note saying so: a
  -- loaded machine's, which changes none of these counts.)
  local once, more = row:match("| (%d+) %((%d+)%) |$")
  if not once then
    once, more = row:match("| (%d+) %((%d+)%) | %*%*harness%-limited: [^*]*%*%*$")
  end
  T.eq({ tonumber(once), tonumber(more) }, { created, 0 }, "every call notified once")
  T.no_match(out, "churn run failed")
  T.no_match(out, "Against the targets", "no targets judged without rows of calls")
  T.no_match(out, "\n%- churn: ", "no note on the churn row")
end, { timeout = 180000 })

T.test("a bench whose callagent cannot start exits 1 with the reason, without hanging", function()
  local p, code = bench({ BENCH_N = "4", BENCH_SECONDS = "1", BENCH_MODES = "audio/pcmu", BENCH_STORE = "bogus" })
  T.eq(code, 1)
  T.match(p:errtext(), "bench failed: .*callagent did not start")
  T.match(p:errtext(), "store%.backend")
end, { timeout = 180000 })

T.run()
