-- A store method that raises (a backend's way to say "disk full", or a bug
-- in one) instead of returning nil, err: the engine's and the notifier's
-- periodic work logs it and runs again at its next period; no call's end and
-- no notification is lost for good.
local T = require "testing"
local kit = require "callkit"
local http = require "callagent.http"
local store_mod = require "callagent.store"
local notify = require "callagent.notify"

-- The recording store (tests/lib/callagent/store/recording.lua) raises at
-- the first times writes pick(op, args) picks, at most times (1); returns a
-- function giving how many times it raised. Undone after the test.
local function raise_at(times, pick)
  local recording = require "callagent.store.recording"
  local raised = 0
  T.defer(function()
    recording.raise = nil
  end)
  recording.raise = function(op, args)
    if raised < times and pick(op, args) then
      raised = raised + 1
      return "EIO: disk I/O error (the backend raised)"
    end
  end
  return function()
    return raised
  end
end

T.test("a store that raises on a call's final write and on the next periodic one: the write after that takes it, then notifies",
  function()
    -- The final batch's first write (one attempt: no retry to clear before),
    -- and the first periodic write's, 5 s later.
    local raised = raise_at(2, function(op)
      return op == "clear_retry"
    end)
    local env = kit.start({ twilio = { behaviour = "busy" },
      config = { store = { backend = "recording" }, retry = { maxAttempts = 1 } } })
    local id = env:create({ to = "+14155550170", prompt = "x" })
    T.eq(env:wait_final(id, 5000).status, "busy", "the API shows the end the engine holds")
    T.eq(raised(), 1, "the final write raised")
    -- Its notification is recorded last in the batch, and sent once the
    -- batch is through: by the periodic write after the one that raised.
    T.wait_for(function()
      return #env.hooks.received >= 1
    end, 13000, "notified once written")
    T.eq(raised(), 2, "the first periodic write raised too")
    T.eq(env.app.store:get_call(id).status, "busy", "the end is in the store")
    T.eq(env.hooks.received[1].json.data.status, "busy")
  end, { timeout = 20000 })

T.test("an attempt's vendor id the store refused is written with the call's end: the stored attempt has it, once", function()
  local recording = require "callagent.store.recording"
  local refused = 0
  T.defer(function()
    recording.refuse = nil
  end)
  recording.refuse = function(op, args)
    if op == "update_attempt" and type(args[3]) == "table" and args[3].providerCallId and refused == 0 then
      refused = refused + 1
      return "ENOSPC: database or disk is full"
    end
  end
  local env = kit.start({ twilio = { behaviour = "busy" },
    config = { store = { backend = "recording" }, retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550171", prompt = "x" })
  env:wait_final(id, 5000)
  T.eq(refused, 1, "the vendor id's write was refused")
  local pid
  for _, w in ipairs(recording.writes) do
    pid = pid or (w.op == "update_attempt" and w.args[1] == id and w.args[3].providerCallId)
  end
  T.ok(pid, "the vendor id the engine had")
  local c = env.app.store:get_call(id)
  T.eq(c.status, "busy")
  T.eq(#c.attempts, 1, "the attempt once, not once more for the rewrite")
  T.eq({ c.attempts[1].providerCallId, c.attempts[1].status }, { pid, "busy" }, "with its vendor id and its end")
end)

T.test("an attempt's vendor id whose write raised is written with the call's end: the stored attempt has it", function()
  local raised = raise_at(1, function(op, args)
    return op == "update_attempt" and type(args[3]) == "table" and args[3].providerCallId
  end)
  local env = kit.start({ twilio = { behaviour = "busy" },
    config = { store = { backend = "recording" }, retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550174", prompt = "x" })
  T.eq(env:wait_final(id, 5000).status, "busy")
  T.eq(raised(), 1, "the vendor id's write raised")
  local c = env.app.store:get_call(id)
  T.eq(#c.attempts, 1)
  T.eq(c.attempts[1].providerCallId, env.tw.calls[1].sid, "the stored attempt has its vendor id")
end)

T.test("a failed dial whose lastError write raised still ends the call, written whole", function()
  local raised = raise_at(1, function(op, args)
    return op == "update_call" and type(args[2]) == "table" and args[2].lastError
  end)
  local env = kit.start({ twilio = { behaviour = "reject-api" },
    config = { store = { backend = "recording" }, retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550175", prompt = "x" })
  local view = env:wait_final(id, 5000)
  T.eq(view and view.status, "failed", "the call ended, not left dialing")
  T.eq(raised(), 1, "the lastError write raised")
  local c = env.app.store:get_call(id)
  T.eq(c.status, "failed")
  T.match(c.lastError or "", "21215", "its lastError is in the store")
end)

T.test("the ended event gets the call as it ended when the store cannot read it back", function()
  local recording = require "callagent.store.recording"
  T.defer(function()
    recording.refuse = nil
  end)
  recording.refuse = function(op)
    if op == "get_call" then
      return "EIO: disk I/O error (refused)"
    end
  end
  local ended = {}
  local env = kit.start({ twilio = { behaviour = "busy" }, on = { ended = function(call)
    ended[#ended + 1] = call or false
  end }, config = { store = { backend = "recording" }, retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550175", prompt = "x" })
  T.wait_for(function()
    return #ended > 0
  end, 5000, "the ended event")
  recording.refuse = nil
  T.eq(#ended, 1)
  T.ok(ended[1], "a call, not nil")
  T.eq({ ended[1].callId, ended[1].status, ended[1].attempts[1].status }, { id, "busy", "busy" })
  T.eq(ended[1], env:wait_final(id, 5000), "the call as the store has it")
end)

T.test("a transcript line whose write raised is kept with its call and written with its end", function()
  local raised = raise_at(1, function(op)
    return op == "add_transcript"
  end)
  local env = kit.start({
    config = { store = { backend = "recording" } },
    realtime = {
      script = function(session)
        assert(session:wait_event("response.create", 5000))
        session:call_function("report_call", { summary = "Done.", outcome = "success" })
        assert(session:wait_event("response.create", 5000))
        session:speak({ ms = 100, text = "Bye." })
      end,
    },
  })
  local id = env:create({ to = "+14155550172", prompt = "Report at once." })
  T.eq(env:wait_final(id, 20000).status, "completed")
  T.eq(raised(), 1, "the line's first write raised")
  local texts = {}
  for _, l in ipairs(env.app.store:get_call(id).transcript) do
    texts[#texts + 1] = l.text
  end
  T.eq(texts, { "Bye." }, "the line is in the store, once")
end)

T.test("a status event whose write raised inside its commit is kept and written later: every status event is stored", function()
  local raised = raise_at(1, function(op, args)
    return op == "add_event" and args[2].type == "status" and args[2].to == "dialing"
  end)
  local env = kit.start({ twilio = { behaviour = "busy" },
    config = { store = { backend = "recording" }, retry = { maxAttempts = 1 } } })
  local id = env:create({ to = "+14155550173", prompt = "x" })
  T.eq(env:wait_final(id, 5000).status, "busy")
  T.eq(raised(), 1, "the dialing event's write raised")
  local to = {}
  for _, e in ipairs(env.app.store:get_call(id).events) do
    if e.type == "status" then
      to[#to + 1] = e.to
    end
  end
  T.eq(to, { "dialing", "busy" }, "both status events, in order")
end)

-- A real SQLite store whose pending_notifications raises while armed.
local function raising_store(path)
  local inner = assert(store_mod.open({ backend = "sqlite", path = path, retentionDays = 30 }))
  local w = { armed = 0, raised = 0, inner = inner }
  return setmetatable(w, {
    __index = function(_, k)
      local f = inner[k]
      if type(f) ~= "function" then
        return f
      end
      return function(_, ...)
        if (k == "pending_notifications" or k == "mark_notified") and w.armed > 0 and w.fail == k then
          w.armed, w.raised = w.armed - 1, w.raised + 1
          error("EIO: disk I/O error (the backend raised)", 0)
        end
        return f(inner, ...)
      end
    end,
  })
end

local AFTER_RAISE = {
  pending_notifications = "the next sweep sends the notification",
  mark_notified = "the next sweep marks the delivered notification sent, without sending it again",
}
for _, method in ipairs({ "pending_notifications", "mark_notified" }) do
  T.test("a store whose " .. method .. " raises once: " .. AFTER_RAISE[method], function()
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
    local store = raising_store(T.tmpdir() .. "/n.db")
    T.defer(function()
      store.inner:close()
    end)
    local n = notify.new({ hooksUrl = hooks:url("/hooks"), hooksToken = "hooks-token-for-tests" }, store,
      { attempts = 1, base_delay_ms = 10, sweep_ms = 100 })
    T.defer(function()
      n:stop()
    end)
    T.eq(n:resume(), 0, "nothing at start")
    -- Recorded by another run, say: only a sweep sends it.
    assert(store:add_notification("c_1:completed", "c_1", "{}"))
    store.fail, store.armed = method, 1
    T.wait_for(function()
      return store.raised == 1
    end, 2000, "a sweep met the raise")
    T.wait_for(function()
      return #store:pending_notifications() == 0
    end, 2000, "a later sweep delivered it and marked it sent")
    T.eq(received, { "c_1:completed" }, "delivered once")
  end)
end

T.run()
