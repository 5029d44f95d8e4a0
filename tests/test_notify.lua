-- callagent.notify against a real receiver: a backlog found at start is sent
-- a few at a time, oldest first, each once.
local T = require "testing"
local http = require "callagent.http"
local timer = require "callagent.timer"
local store_mod = require "callagent.store"
local notify = require "callagent.notify"

-- A notifier on a fresh SQLite store, sending to a receiver whose
-- /hooks/agent is handler: the notifier and its store.
local function notifier(handler, opts)
  local hooks = http.server({ headers = { "idempotency-key" } })
  hooks:post("/hooks/agent", handler)
  assert(hooks:listen())
  T.defer(function()
    hooks:close()
  end)
  local store = assert(store_mod.open({ backend = "sqlite", path = T.tmpdir() .. "/n.db", retentionDays = 30 }))
  T.defer(function()
    store:close()
  end)
  local n = notify.new({ hooksUrl = hooks:url("/hooks"), hooksToken = "hooks-token-for-tests" }, store,
    opts or { base_delay_ms = 50 })
  T.defer(function()
    n:stop()
  end)
  return n, store
end

T.test("a backlog of 40 notifications at start is sent 8 at a time, oldest first, each once", function()
  local now, most, order = 0, 0, {}
  local n, store = notifier(function(req)
    now = now + 1
    most = math.max(most, now)
    order[#order + 1] = req.headers["idempotency-key"]
    timer.sleep(50)
    now = now - 1
    return 200, { ok = true }
  end)
  local keys = {}
  for i = 1, 40 do
    keys[i] = ("c_%02d:completed"):format(i)
    assert(store:add_notification(keys[i], ("c_%02d"):format(i), "{}"))
    assert(store.db:run("UPDATE notifications SET created = ? WHERE key = ?", 1000 + i, keys[i]))
  end
  T.eq(n:resume(), 40)
  T.wait_for(function()
    return #store:pending_notifications() == 0
  end, 10000, "every one delivered")
  T.eq(#order, 40, "each once")
  T.le(most, 8, "at most 8 at once")
  T.eq(order[1], keys[1], "the oldest first")
end)

T.test("a receiver's Retry-After (429 or 503) is waited for before the next try, up to a minute", function()
  local at = {}
  local n, store = notifier(function()
    at[#at + 1] = timer.now()
    if #at == 1 then
      return 429, { error = "slow down" }, { ["Retry-After"] = "2" }
    elseif #at == 2 then
      return 503, { error = "later" }, { ["Retry-After"] = "Fri, 31 Dec 1999 23:59:59 GMT" } -- a date: not read
    end
    return 200, { ok = true }
  end)
  assert(store:add_notification("c_1:completed", "c_1", "{}"))
  n:send("c_1:completed", "{}")
  T.wait_for(function()
    return #at == 3
  end, 10000, "three tries")
  T.ge(at[2] - at[1], 1950, "the first retry waited the 2 s the receiver asked for")
  T.lt(at[3] - at[2], 1000, "a Retry-After that is a date is not read: the schedule's 100 ms")
  T.wait_for(function()
    return #store:pending_notifications() == 0
  end, 5000, "delivered")
end)


T.test("a notification out of tries is sent again while the app runs (a sweep), not only after a restart; once", function()
  local tries, delivered = 0, 0
  local hooks = http.server({ headers = { "idempotency-key" } })
  hooks:post("/hooks/agent", function()
    tries = tries + 1
    if tries <= 2 then
      return 503, { error = "down for a while" }
    end
    delivered = delivered + 1
    return 200, { ok = true }
  end)
  assert(hooks:listen())
  T.defer(function()
    hooks:close()
  end)
  local store = assert(store_mod.open({ backend = "sqlite", path = T.tmpdir() .. "/n.db", retentionDays = 30 }))
  T.defer(function()
    store:close()
  end)
  local n = notify.new({ hooksUrl = hooks:url("/hooks"), hooksToken = "hooks-token-for-tests" }, store,
    { attempts = 2, base_delay_ms = 20, sweep_ms = 300 })
  T.defer(function()
    n:stop()
  end)
  T.eq(n:resume(), 0, "nothing pending at the start")
  assert(store:add_notification("c_1:completed", "c_1", "{}"))
  n:send("c_1:completed", "{}")
  T.wait_for(function()
    return tries == 2 and not n.in_flight["c_1:completed"]
  end, 5000, "both tries failed: given up")
  T.eq(#store:pending_notifications(), 1, "still pending")
  T.wait_for(function()
    return #store:pending_notifications() == 0
  end, 5000, "sent again by the sweep, without a restart")
  timer.sleep(800)
  T.eq({ tries, delivered }, { 3, 1 }, "delivered once; a sweep sends nothing delivered")
end)

T.test("a receiver that is down costs one round of tries per sweep, not every notification's: the sweep stops", function()
  local tries = 0
  local n, store = notifier(function()
    tries = tries + 1
    return 503, { error = "down" }
  end, { attempts = 2, base_delay_ms = 10, sweep_ms = 60000 })
  for i = 1, 40 do
    assert(store:add_notification(("c_%02d:completed"):format(i), ("c_%02d"):format(i), "{}"))
  end
  T.eq(n:resume(), 40)
  T.wait_for(function()
    return tries >= 16 and next(n.in_flight) == nil
  end, 5000, "the first ones out of tries")
  timer.sleep(300)
  T.eq(tries, 16, "8 at once, 2 tries each, then no more: the rest wait for the next sweep")
  T.eq(#store:pending_notifications(), 40, "none lost: all still pending")
end)


T.test("a notification the receiver never takes does not hold back the healthy ones behind it at every sweep", function()
  -- 8 poisoned payloads (5xx for ever), the oldest: each sweep's 8 workers
  -- took them first, all ran out of tries, and the sweep ended there; the
  -- healthy one behind them never went out while the app ran.
  local tries = {}
  local n, store = notifier(function(req)
    local key = req.headers["idempotency-key"]
    tries[key] = (tries[key] or 0) + 1
    if key:match("^bad") then
      return 500, { error = "cannot take this one" }
    end
    return 200, { ok = true }
  end, { attempts = 1, base_delay_ms = 10, sweep_ms = 150 })
  for i = 1, 8 do
    local key = ("bad_%d:completed"):format(i)
    assert(store:add_notification(key, "bad_" .. i, "{}"))
    assert(store.db:run("UPDATE notifications SET created = ? WHERE key = ?", 1000 + i, key))
  end
  assert(store:add_notification("good:completed", "good", "{}"))
  assert(store.db:run("UPDATE notifications SET created = ? WHERE key = ?", 2000, "good:completed"))
  T.eq(n:resume(), 9)
  -- The receiver counts the try before the notifier has its answer and
  -- records the delivery: wait for both.
  T.wait_for(function()
    return tries["good:completed"] == 1 and #store:pending_notifications() == 8
  end, 3000, "the healthy one sent by a later sweep, and recorded delivered")
  timer.sleep(200)
  T.eq(tries["good:completed"], 1, "sent once")
  T.eq(#store:pending_notifications(), 8, "only the poisoned ones left")
end)

T.test("a call notified while sweeps run is sent once, and so is each of the backlog", function()
  local by_key, order = {}, {}
  local n, store = notifier(function(req)
    local key = req.headers["idempotency-key"]
    order[#order + 1] = key
    timer.sleep(30) -- a receiver that takes a moment: sweeps overlap the sends
    if #order <= 12 then
      return 503, { error = "busy" }
    end
    by_key[key] = (by_key[key] or 0) + 1
    return 200, { ok = true }
  end, { attempts = 2, base_delay_ms = 10, sweep_ms = 40 })
  for i = 1, 12 do
    assert(store:add_notification(("c_%02d:completed"):format(i), ("c_%02d"):format(i), "{}"))
  end
  T.eq(n:resume(), 12)
  for i = 1, 6 do
    timer.sleep(25)
    -- As the engine does: recorded in the commit of the final status, sent at once.
    local key = ("e_%d:completed"):format(i)
    assert(store:add_notification(key, "e_" .. i, "{}"))
    n:send(key, "{}")
  end
  T.wait_for(function()
    return #store:pending_notifications() == 0 and next(n.in_flight) == nil
  end, 5000, "all delivered")
  timer.sleep(200)
  local twice = {}
  for key, c in pairs(by_key) do
    if c > 1 then
      twice[#twice + 1] = key
    end
  end
  T.eq(twice, {}, "none delivered twice")
end)
T.test("a 2xx with a body past fetch's limit is delivered once, not sent again at every try", function()
  -- Only the status and headers are read: a receiver answering its 200 with
  -- 17 MiB (a page, a dump) was a failure (EMSGSIZE), and the notification
  -- went out again at every try and every sweep.
  local tries = 0
  local big = string.rep("x", 17 * 1024 * 1024)
  local n, store = notifier(function()
    tries = tries + 1
    return 200, big, { ["Content-Type"] = "text/plain" }
  end, { attempts = 3, base_delay_ms = 20 })
  assert(store:add_notification("c_1:completed", "c_1", "{}"))
  n:send("c_1:completed", "{}")
  T.wait_for(function()
    return not n.in_flight["c_1:completed"]
  end, 10000, "the delivery over")
  T.eq({ tries, #store:pending_notifications() }, { 1, 0 }, "delivered at the first try")
end)
T.test("a 4xx or 5xx with a body past fetch's limit is judged by its status: 422 refused, 500 retried, 'HTTP n' recorded", function()
  -- As EMSGSIZE, a 422 (the receiver will never take it) was sent again
  -- at every try and sweep like a network error.
  local big = string.rep("x", 17 * 1024 * 1024)
  local answers = { ["c_1:completed"] = 422, ["c_2:completed"] = 500 }
  local tries = {}
  local n, store = notifier(function(req)
    local key = req.headers["idempotency-key"]
    tries[key] = (tries[key] or 0) + 1
    return answers[key], big, { ["Content-Type"] = "text/plain" }
  end, { attempts = 2, base_delay_ms = 20 })
  for key in pairs(answers) do
    assert(store:add_notification(key, key:match("^[^:]+"), "{}"))
    n:send(key, "{}")
  end
  T.wait_for(function()
    return not n.in_flight["c_1:completed"] and not n.in_flight["c_2:completed"]
  end, 10000, "the deliveries over")
  T.eq(tries, { ["c_1:completed"] = 1, ["c_2:completed"] = 2 })
  local rows = {}
  for _, r in ipairs(store.db:rows("SELECT key, sent, last_error FROM notifications ORDER BY key")) do
    rows[#rows + 1] = { r.key or r[1], r.sent or r[2], r.last_error or r[3] }
  end
  T.eq(rows, { { "c_1:completed", 2, "HTTP 422" }, { "c_2:completed", 0, "HTTP 500" } })
end)

T.test("a token changed after start (app.config.notify) and refused: a start with the start's token sends it again", function()
  -- The receiver takes only the token of the config file; the operator set
  -- another one after start, which it refuses (401). Recorded as refused
  -- under the start's token, the next start (the config file's token) took
  -- it for refused under its own, and never sent it.
  local got = {}
  local n, store = notifier(function(req)
    got[#got + 1] = req.headers.authorization
    return req.headers.authorization == "Bearer hooks-token-for-tests" and 200 or 401, {}
  end)
  T.eq(n:resume(), 0, "started: nothing pending")
  local start_cfg = { hooksUrl = n:conf().hooksUrl, hooksToken = n:conf().hooksToken }
  n:conf().hooksToken = "a-token-set-after-start"
  assert(store:add_notification("c_1:completed", "c_1", "{}"))
  n:send("c_1:completed", "{}")
  T.wait_for(function()
    return not n.in_flight["c_1:completed"]
  end, 5000, "the delivery over")
  T.eq({ #got, #store:pending_notifications() }, { 1, 0 }, "refused once")
  n:stop()
  local again = notify.new(start_cfg, store, { base_delay_ms = 50 })
  T.defer(function()
    again:stop()
  end)
  again:resume()
  T.wait_for(function()
    return #got == 2 and not again.in_flight["c_1:completed"]
  end, 5000, "sent again by the next start")
  T.eq(got[2], "Bearer hooks-token-for-tests")
  T.eq(#store:pending_notifications(), 0)
  T.eq(store.db:rows("SELECT sent FROM notifications")[1].sent, 1, "delivered")
end)

-- A receiver that moved: its /new/agent answers 200 and keeps each
-- request's Authorization in got.
local function moved_receiver(got)
  local moved = http.server({})
  moved:post("/new/agent", function(req)
    got[#got + 1] = req.headers.authorization
    return 200, { ok = true }
  end)
  assert(moved:listen())
  T.defer(function()
    moved:close()
  end)
  return moved
end

T.test("hooksUrl and hooksToken changed between two tries (app.config.notify): the retry goes to the new address with the new token, the old one gets neither", function()
  -- The receiver moved, and its token with it: a retry that kept the first
  -- try's address sent the new token there.
  local old_got, new_got = {}, {}
  local n, store = notifier(function(req)
    old_got[#old_got + 1] = req.headers.authorization
    return 503, { error = "moving" }
  end)
  local moved = moved_receiver(new_got)
  assert(store:add_notification("c_1:completed", "c_1", "{}"))
  n:send("c_1:completed", "{}")
  T.wait_for(function()
    return #old_got == 1 and #n.sleepers == 1
  end, 5000, "the first try answered 503, the retry waiting its turn")
  n:conf().hooksUrl, n:conf().hooksToken = moved:url("/new"), "the-new-token"
  T.wait_for(function()
    return not n.in_flight["c_1:completed"]
  end, 5000, "the delivery over")
  T.eq(old_got, { "Bearer hooks-token-for-tests" }, "the old address: its first try only")
  T.eq(new_got, { "Bearer the-new-token" })
  T.eq(#store:pending_notifications(), 0, "delivered")
end)

T.test("app.config.notify replaced by a new table after start: the call's notification goes to its hooksUrl with its token", function()
  local kit = require "callkit"
  local env = kit.start({ twilio = { behaviour = "busy" }, config = { retry = { maxAttempts = 1 } } })
  local got = {}
  local moved = moved_receiver(got)
  env.app.config.notify = { hooksUrl = moved:url("/new"), hooksToken = "the-new-token" }
  local id = env:create({ to = "+14155550103", prompt = "Say hello." })
  env:wait_final(id, 10000)
  T.wait_for(function()
    return #got == 1
  end, 5000, "the new table's receiver notified")
  T.eq(got, { "Bearer the-new-token" })
  T.eq(#env.hooks.received, 0, "the start's receiver got nothing")
end, { timeout = 20000 })
T.run()
