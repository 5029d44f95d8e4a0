-- The outside world of tests/apps/durable.lua (the Twilio app on a SQLite
-- store): fake Twilio, fake model and a notification receiver, with a way to
-- (re)start the real callagent process on one store file and port and to use
-- its API. Shared by the restart and shutdown tests.
--
--   local world = require "durable_world"
--   local w = world.new({ behaviour = ..., script = ..., retry_ms = 2000 })
--   w.start(); local id = w.create("+14155550100"); w.wait_final(id)
--   local id, tw = w.ring("+14155550100")  -- placed, and ringing at the fake Twilio
--
-- opts: behaviour (fake Twilio), script (fake model), retry_ms (1500),
-- config (merged over the app's), ready_ms (10000), and for the receiver:
-- hook_ms (it takes this long to answer), hold_first (the first request is
-- never answered), refuse (400), redirect (308 to this Location).
-- What the receiver saw: w.requests (Idempotency-Keys in order), and of the
-- answered 200s w.deliveries ({key, body}), w.by_key (key -> count) and
-- w.by_call (call id -> set of keys). w.stored() reads the store file,
-- w.dials_by_call() groups the fake Twilio's calls; durable.tally(counts)
-- writes counts as one sorted line for T.diag.
local T = require "testing"
local http = require "callagent.http"
local fetch = require "callagent.fetch"
local json = require "callagent.json"
local timer = require "callagent.timer"
local sqlite = require "callagent.sqlite"
local fake_tw = require "fakes.twilio"
local fake_rt = require "fakes.realtime"

local M = {
  SID = "AC" .. string.rep("b2", 16),
  TOKEN = "tw-token-durable-tests",
  KEY = "sk-durable-tests",
  FINAL = { completed = true, busy = true, no_answer = true, failed = true, canceled = true },
}

-- A behaviour for the fake Twilio: the first call placed gets first (a
-- behaviour, or a word: "busy"), the next ones are answered.
function M.first_then_answer(first)
  local n = 0
  return function()
    n = n + 1
    return n == 1 and first or "answer"
  end
end

-- A model that greets, reports at once and says goodbye.
function M.report_script(session)
  assert(session:wait_event("response.create", 5000))
  session:report_and_goodbye({ summary = "All good.", outcome = "success" }, { ms = 100, text = "Bye." })
end

function M.tally(t)
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = k
  end
  table.sort(keys)
  for i, k in ipairs(keys) do
    keys[i] = k .. " " .. t[k]
  end
  return table.concat(keys, ", ")
end

function M.new(opts)
  opts = opts or {}
  local w = { requests = {}, deliveries = {}, by_key = {}, by_call = {} }
  w.tw = assert(fake_tw.start({ account_sid = M.SID, auth_token = M.TOKEN, behaviour = opts.behaviour }))
  w.rt = assert(fake_rt.start({ api_key = M.KEY, script = opts.script }))
  w.hooks = http.server({ headers = { "idempotency-key" } })
  w.hooks:post("/hooks/agent", function(req)
    local key = req.headers["idempotency-key"]
    w.requests[#w.requests + 1] = key
    if opts.hold_first and #w.requests == 1 then
      timer.sleep(60000) -- never answered before the app is killed
    end
    if opts.hook_ms then
      timer.sleep(opts.hook_ms) -- a receiver that takes a moment (an agent run)
    end
    if opts.refuse then
      return 400, { error = "no such session" }
    end
    if opts.redirect then
      return 308, "", { Location = opts.redirect }
    end
    w.deliveries[#w.deliveries + 1] = { key = key, body = req:json() }
    if key then
      w.by_key[key] = (w.by_key[key] or 0) + 1
      local id = key:match("^(.-):")
      if id then
        w.by_call[id] = w.by_call[id] or {}
        w.by_call[id][key] = true
      end
    end
    return 200, { ok = true }
  end)
  assert(w.hooks:listen())
  w.db = T.tmpdir() .. "/calls.db"
  w.port = T.free_port()
  w.base = "http://127.0.0.1:" .. w.port
  T.defer(function()
    if w.app and w.app:running() then
      w.app:kill("SIGKILL")
    end
    w.tw:close()
    w.rt:close()
    w.hooks:close()
  end)

  -- The app's environment, listening on port (w.port) with store db (w.db).
  function w.env(port, db)
    return {
      CA_PORT = tostring(port or w.port),
      CA_TW_SID = M.SID,
      CA_TW_TOKEN = M.TOKEN,
      CA_TW_URL = w.tw.url,
      CA_RT_KEY = M.KEY,
      CA_RT_URL = w.rt.url,
      CA_HOOKS_URL = w.hooks:url("/hooks"),
      CA_DB = db or w.db,
      CA_RETRY_MS = tostring(opts.retry_ms or 1500),
      CA_CONFIG = opts.config and json.encode(opts.config),
    }
  end
  function w.start()
    w.app = T.spawn_app(T.root .. "/tests/apps/durable.lua", nil, { env = w.env() })
    -- What it said is read when the wait fails (one that exited, its port
    -- taken meanwhile say, ends the wait at once).
    T.wait_for(function()
      return w.app.out[1] and w.app.out[1]:match("^ready") or not w.app:running()
    end, opts.ready_ms or 10000, function()
      return "the app to be ready: " .. w.app.errtext()
    end)
    T.ok(w.app:running(), "the app exited before it was ready: " .. w.app.errtext())
  end
  function w.kill9()
    w.app:kill("SIGKILL")
    w.app:wait(5000)
  end
  -- status, decoded body; nil, err when the request failed.
  function w.api(method, path, body)
    local res, err = fetch(w.base .. path, {
      method = method,
      body = body and json.encode(body),
      headers = body and { ["Content-Type"] = "application/json" } or nil,
    })
    if not res then
      return nil, err
    end
    return res.status, json.try_decode(res.body)
  end
  function w.create(to, prompt)
    local status, created = w.api("POST", "/v1/calls", { to = to, prompt = prompt or "Talk." })
    assert(status == 201, "POST /v1/calls answered " .. tostring(status) .. " " .. json.encode(created))
    return created.callId
  end
  function w.call(id)
    local status, rec = w.api("GET", "/v1/calls/" .. id)
    assert(status == 200, "GET call " .. tostring(status) .. " " .. tostring(rec))
    return rec
  end
  function w.wait(id, pred, ms, what)
    local rec
    T.wait_for(function()
      rec = w.call(id)
      return pred(rec)
    end, ms or 10000, what)
    return rec
  end
  function w.wait_final(id, ms)
    return w.wait(id, function(r)
      return M.FINAL[r.status]
    end, ms, "the call to end")
  end
  -- The records in the store file (id -> record), and its notification rows.
  function w.stored()
    local db = assert(sqlite.open(w.db, { readonly = true }))
    local recs = {}
    for _, r in ipairs(db:rows("SELECT id, doc FROM calls")) do
      recs[r.id] = json.decode(r.doc)
    end
    local notes = db:rows("SELECT * FROM notifications")
    db:close()
    return recs, notes
  end
  -- The fake Twilio's calls by callagent's call id (from their voice URL), in order.
  function w.dials_by_call()
    local by = {}
    for _, c in ipairs(w.tw.calls) do
      local id = c.params.Url and c.params.Url:match("callId=([^&]+)")
      if id then
        by[id] = by[id] or {}
        table.insert(by[id], c)
      end
    end
    return by
  end
  -- A call placed, and its fake Twilio call once it rings: id, tw.
  function w.ring(to, prompt)
    local id = w.create(to, prompt)
    local tw = w.tw:wait_call(5000)
    assert(tw:wait_status("ringing", 3000), "ringing")
    return id, tw
  end
  -- The same, then callagent killed (-9) and started again.
  function w.ring_and_restart(to)
    local id, tw = w.ring(to)
    w.kill9()
    w.start()
    return id, tw
  end
  return w
end

return M
