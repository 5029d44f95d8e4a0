-- make bench's harness (tests/bench/bench.lua with its load generator and
-- loopback floor): a small row runs end to end and prints what it measured,
-- and a bench that cannot start callagent fails fast, saying why. No speed
-- is asserted here: that is what `make bench` itself is for.
local T = require "testing"

local function bench(env)
  env.BENCH_BIN = T.bin
  env.BENCH_PIN = "0"
  env.BENCH_FLOOR_SECONDS = "0.1" -- the floor keeps both cores busy: briefly, here
  local p = T.spawn_app(T.root .. "/tests/bench/bench.lua", nil, { env = env })
  local code = p:wait(150000)
  return p, code
end

T.test("small rows of calls run end to end in both output modes, nothing lost", function()
  local p, code = bench({ BENCH_N = "2,4", BENCH_SECONDS = "1", BENCH_MODES = "audio/pcmu,audio/pcm" })
  local out = p:text()
  T.diag(out)
  T.eq(code, 0, "exit status; stderr: " .. p:errtext())
  T.match(out, "kernel floor %(200 connections%): [%d.]+ µs CPU per loopback")
  local ms = tonumber(out:match("start%-up %(spawn to serving%): min (%d+) ms"))
  T.ok(ms and ms > 0, "start-up time printed")
  for _, mode in ipairs({ "pcmu", "pcm" }) do
    for _, n in ipairs({ 2, 4 }) do
      local what = mode .. ", " .. n .. " calls"
      local ok_, failed, frames, lost_in, lost_out =
        out:match("\n| " .. mode .. " | " .. n .. " | (%d+)/(%d+) | (%d+) | (%d+)/(%d+) |")
      T.eq({ ok_, failed, lost_in, lost_out }, { tostring(n), "0", "0", "0" }, what .. ": set up, none failed, none lost")
      -- 1 s measured (after 2 s of warm-up): 50 frames a second per call.
      T.ge(tonumber(frames) or 0, n * 40, what .. ": frames measured")
      local busy, slow = out:match("\n| " .. mode .. " | " .. n .. " |[^\n]* | [%d.]+ | (%d+)%% %((%d+)%%%) |")
      T.ok(busy and tonumber(busy) <= 100 and tonumber(slow) <= 100, what .. ": the loop's busy share, from /healthz")
    end
    T.match(out, "RSS slope %(audio/" .. mode .. "%): %-?[%d.]+ KiB per call", mode .. ": the slope over the rows")
    T.match(out, "set%-up %(audio/" .. mode .. "%): callagent CPU per call created[^\n]*: [%d.]+ ms at 2 %([%d.]+ s%), [%d.]+ ms at 4",
      mode .. ": set-up's CPU per call, per row")
  end
end, { timeout = 180000 })

T.test("a bench whose callagent cannot start exits 1 with the reason, without hanging", function()
  local p, code = bench({ BENCH_N = "4", BENCH_SECONDS = "1", BENCH_MODES = "audio/pcmu", BENCH_STORE = "bogus" })
  T.eq(code, 1)
  T.match(p:errtext(), "bench failed: .*callagent did not start")
  T.match(p:errtext(), "store%.backend")
end, { timeout = 180000 })

T.run()
