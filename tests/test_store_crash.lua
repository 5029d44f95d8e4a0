-- kill -9 of the real callagent process at points of a call's life that the
-- restart tests (test_store_restart.lua) leave out, then a start on the same
-- SQLite store: every call ends truthfully, none is lost.
local T = require "testing"
local timer = require "callagent.timer"
local durable = require "durable_world"

local world = durable.new

local report_script = durable.report_script

local first_then_answer = durable.first_then_answer

-- The first call rings on; Twilio takes a cancel of it at once but answers
-- the request late, and its final callback never comes: a kill -9 while
-- that answer is on its way leaves the store saying the attempt rings,
-- while Twilio says canceled.
local CANCEL_ANSWERED_LATE = { ring_ms = 60000, lost_callbacks = { completed = true }, update_delay_ms = 8000 }

-- Waits for the call's notifications: the keys the receiver got, once
-- nothing more came for a moment.
local function notified(w)
  T.wait_for(function()
    return #w.deliveries >= 1
  end, 10000, "the notification")
  timer.sleep(300)
  return w.requests
end

T.test("kill -9 while the stop's cancel of a ringing call is on its way: the next start dials it again, not canceled",
  function()
    local w = world({ behaviour = first_then_answer(CANCEL_ANSWERED_LATE), script = report_script })
    w.start()
    local id, tw = w.ring("+14155550190")
    assert(w.app:kill("SIGTERM"))
    T.wait_for(function()
      return tw.final == "canceled"
    end, 5000, "the stop's cancel taken at Twilio")
    w.kill9()
    T.eq(w.stored()[id].status, "dialing", "killed before the stop could write the cancel")
    w.start()
    local rec = w.wait_final(id, 20000)
    T.eq({ rec.status, #rec.attempts, #w.tw.calls }, { "completed", 2, 2 },
      "the stop canceled it to dial it again, and nobody hung it up: it is dialed again")
    T.eq({ rec.attempts[1].status, rec.attempts[1].reason }, { "canceled", "callagent stopped while it rang" })
    T.eq(notified(w), { id .. ":completed" }, "notified once, of the end")
  end, { timeout = 60000 })

T.test("kill -9 while the ring timeout's cancel is on its way: no_answer by the retry policy after the restart, not canceled",
  function()
    local w = world({
      behaviour = first_then_answer(CANCEL_ANSWERED_LATE),
      script = report_script,
      retry_ms = 200,
      config = { retry = { maxAttempts = 2 }, call = { ringTimeoutSec = 1, statusGraceSec = 1 } },
    })
    w.start()
    local id = w.create("+14155550191")
    local tw = w.tw:wait_call(5000)
    T.wait_for(function()
      return tw.final == "canceled"
    end, 8000, "the ring timeout's cancel taken at Twilio")
    w.kill9()
    T.eq(w.stored()[id].status, "dialing", "killed before the ring timeout could end the attempt")
    w.start()
    local rec = w.wait_final(id, 20000)
    T.eq({ rec.status, #rec.attempts, #w.tw.calls }, { "completed", 2, 2 }, "its retry dialed, as no_answer is")
    T.eq({ rec.attempts[1].status, rec.attempts[1].reason }, { "no_answer", "ring timeout" })
    T.eq(notified(w), { id .. ":completed" }, "notified once, of the end")
  end, { timeout = 60000 })

T.test("a stop whose hang-up of a call placed meanwhile Twilio refused: the next start cancels that ring before it dials again",
  function()
    -- The dial's answer comes 1.5 s late, during the stop, which queues the
    -- call again and hangs up the call placed: refused (503), it rings on.
    -- The next start's cancel is taken: the ring is over, and the call is
    -- dialed then, not 10 + 1 s after the first dial (its ring timeout).
    local first = { ring_ms = 60000, create_delay_ms = 1500, update_fail = 503, update_fail_times = 1 }
    local w = world({
      behaviour = first_then_answer(first),
      script = report_script,
      config = { call = { ringTimeoutSec = 10, statusGraceSec = 1 } },
    })
    w.start()
    local id = w.create("+14155550192")
    local tw = w.tw:wait_call(5000)
    assert(w.app:kill("SIGTERM"))
    T.eq(w.app:wait(10000), 0)
    T.eq({ w.stored()[id].status, tw.final }, { "queued", nil }, "queued, its first call still ringing at Twilio")
    w.start()
    local rec = w.wait_final(id, 20000)
    T.eq({ rec.status, #rec.attempts, #w.tw.calls }, { "completed", 2, 2 })
    T.eq(tw.final, "canceled", "the restart canceled the ring the stop could not")
    T.ge(w.tw.calls[2].created_at, tw.ended_at, "the second call placed once the first no longer rang")
    T.lt(w.tw.calls[2].created_at - tw.ended_at, 3000, "and once it was canceled, not at its ring timeout")
    T.eq(notified(w), { id .. ":completed" }, "notified once, of the end")
  end, { timeout = 60000 })

T.test("a call's record or attempt damaged inside a sound store file stops the start with an error naming the file and the call",
  function()
    local store = require "callagent.store.sqlite"
    for _, damage in ipairs({
      { "UPDATE calls SET doc = '{\"status\":' WHERE id = 'c_live'", "the record of call c_live", "Expected value" },
      { "UPDATE attempts SET doc = '7' WHERE call_id = 'c_live'", "a row of attempts of call c_live", "a JSON number" },
    }) do
      local w = world()
      local s = assert(store.open({ path = w.db }))
      assert(s:insert_call({ id = "c_live", status = "in_progress", attempt = 1, to = "+14155550193", prompt = "Talk.",
        attempts = { { n = 1, status = "in_progress", providerCallId = "CA" .. string.rep("0", 32) } } }))
      assert(s.db:run(damage[1]))
      s:close()
      local code, _, p = T.run_app(T.root .. "/tests/apps/durable.lua", nil, { env = w.env() })
      T.eq(code, 1, damage[2])
      T.match(p.errtext(), "callagent: store: the calls of the last run could not be recovered: ECORRUPT: "
        .. w.db:gsub("%p", "%%%0") .. ": " .. damage[2] .. " is not a JSON object %(" .. damage[3])
    end
  end)

T.test("a delivered notification the store cannot mark sent (a full disk) is not sent again at every sweep; marked once it can",
  function()
    local http = require "callagent.http"
    local notify = require "callagent.notify"
    local store_mod = require "callagent.store"
    local received = {}
    local hooks = http.server({ headers = { "idempotency-key" } })
    hooks:post("/hooks/agent", function(req)
      received[#received + 1] = req.headers["idempotency-key"]
      return 200, { ok = true }
    end)
    assert(hooks:listen())
    T.defer(function()
      hooks:close()
    end)
    -- A real SQLite store whose writes of a notification's state the disk
    -- refuses while full.
    local inner = assert(store_mod.open({ backend = "sqlite", path = T.tmpdir() .. "/n.db", retentionDays = 30 }))
    local full = true
    local store = setmetatable({}, { __index = function(_, k)
      local f = inner[k]
      return function(_, ...)
        if k == "mark_notified" and full then
          return nil, "ENOSPC: database or disk is full"
        end
        return f(inner, ...)
      end
    end })
    local n = notify.new({ hooksUrl = hooks:url("/hooks"), hooksToken = "hooks-token-for-tests" }, store,
      { attempts = 1, base_delay_ms = 10, sweep_ms = 100 })
    T.defer(function()
      n:stop()
      inner:close()
    end)
    assert(inner:add_notification("c_1:completed", "c_1", "{}"))
    n:resume()
    T.wait_for(function()
      return #received >= 1
    end, 2000, "delivered")
    timer.sleep(450) -- four sweeps while the disk is full
    T.eq(received, { "c_1:completed" }, "delivered once, not again at each sweep")
    T.eq(#inner:pending_notifications(), 1, "still pending in the store, which refused the mark")
    full = false
    T.wait_for(function()
      return #inner:pending_notifications() == 0
    end, 2000, "marked sent at a later sweep")
    T.eq(received, { "c_1:completed" }, "and not sent again to mark it")
  end)

-- A Twilio app behind the fake ngrok (tests/bin), on the SQLite store
-- CA_DB, whose tunnel a test can make die (FAKE_NGROK_CONTROL).
local TUNNEL_APP = [[
local callagent = require "callagent"
local task = require "callagent.task"
task.spawn(function()
  local app = assert(callagent.app({
    telephony = { provider = "twilio" },
    server = { port = tonumber(os.getenv("CA_PORT")) },
    twilio = { accountSid = "AC" .. string.rep("0", 32), authToken = "dummy-auth-token", fromNumber = "+15550001111",
      apiBaseUrl = os.getenv("CA_TW_URL") },
    openai = { apiKey = "sk-dummy", connectWhileRinging = false },
    tunnel = { provider = "ngrok", timeoutSec = 10 },
    store = { backend = "sqlite", path = os.getenv("CA_DB") },
  }))
  assert(app:start())
end)
]]

T.test("kill -9 while the paused tunnel's cancel of a ringing call is on its way: the next start dials it again, not canceled",
  function()
    local fetch = require "callagent.fetch"
    local json = require "callagent.json"
    local dir = T.tmpdir()
    local port = T.free_port()
    local base = "http://127.0.0.1:" .. port
    local tw = assert(require("fakes.twilio").start({
      account_sid = "AC" .. string.rep("0", 32),
      auth_token = "dummy-auth-token",
      behaviour = first_then_answer(CANCEL_ANSWERED_LATE),
      public_url_rewrite = function(u)
        return (u:gsub("^https://[^/]+", base)) -- the tunnel's URL reaches the app
      end,
    }))
    T.defer(function()
      tw:close()
    end)
    local bin = T.tmpdir()
    assert(os.execute(string.format("ln -s '%s/tests/bin/ngrok' '%s/ngrok'", T.root, bin)))
    local env = { PATH = bin, CALLAGENT_BIN = T.bin, FAKE_NGROK_CONTROL = dir, CA_PORT = tostring(port),
      CA_TW_URL = tw.url, CA_DB = dir .. "/calls.db" }
    local function start()
      local ready
      local p = T.spawn_app(nil, nil, { source = TUNNEL_APP, env = env, on_stderr = function(line)
        ready = ready or line:find("callagent ready", 1, true)
      end })
      T.wait_for(function()
        return ready or p.done
      end, 15000, "callagent ready")
      T.ok(ready, p.errtext())
      return p
    end
    local p = start()
    local res = assert(fetch(base .. "/v1/calls", { method = "POST", body = json.encode({ to = "+14155550194",
      prompt = "Talk." }), headers = { ["Content-Type"] = "application/json" } }))
    T.eq(res.status, 201, res.body)
    local id = json.decode(res.body).callId
    local first = tw:wait_call(5000)
    assert(first:wait_status("ringing", 3000), "ringing")
    assert(io.open(dir .. "/die", "w")):close() -- ngrok's session ends: calls pause
    T.wait_for(function()
      return first.final == "canceled"
    end, 5000, "the pause's cancel taken at Twilio")
    p:kill("SIGKILL")
    p:wait(5000)
    os.remove(dir .. "/die")
    os.remove(dir .. "/died") -- the next ngrok's tunnel comes up at once
    start()
    T.wait_for(function()
      return #tw.calls >= 2
    end, 10000, "dialed again")
    local rec = json.decode(assert(fetch(base .. "/v1/calls/" .. id)).body)
    T.eq({ #rec.attempts, rec.attempts[1].status, rec.attempts[1].reason },
      { 2, "canceled", "the public tunnel went down while it rang" })
  end, { timeout = 60000 })

T.test("killed while a dial was on its way, on a clock set back a day since: the retry waits a ring's time, not a day more",
  function()
    -- The last run's clock was a day ahead, and the host's clock was set
    -- back before this start: the retry's wait for the vendor's ring of a
    -- call nobody can cancel (ringTimeoutSec + statusGraceSec after the
    -- dial, 1 + 1 s here) is that long at most, not a day more.
    local store = require "callagent.store.sqlite"
    local ahead = require("callagent.calls").iso(require("callagent.core").time() + 86400)
    local w = world({ config = { call = { ringTimeoutSec = 1, statusGraceSec = 1 } }, retry_ms = 50 })
    local s = assert(store.open({ path = w.db }))
    assert(s:insert_call({ id = "c_skew", status = "dialing", attempt = 1, to = "+14155550195", prompt = "Talk.",
      createdAt = ahead, attempts = { { n = 1, status = "dialing", startedAt = ahead } } }))
    s:close()
    w.start()
    local call = w.tw:wait_call(6000)
    T.eq(call and call.params.To, "+14155550195", "dialed again within a ring's time")
  end, { timeout = 30000 })

T.run()
