-- The app's prune of old calls (at start, then hourly) runs in a task of its
-- own and takes turns with the loop: months of calls removed at once do not
-- hold up live calls' audio, nor the start; a stop in the middle ends it.
local T = require "testing"
local kit = require "callkit"
local timer = require "callagent.timer"
local log = require "callagent.log"
local sqlite = require "callagent.sqlite"
local callagent = require "callagent"
local core = require "callagent.core"

-- A stopped app's store file with that many calls finished 40 days ago (ten
-- transcript lines each): its config.
local function old_store(calls)
  local env = kit.start({})
  env.app:stop()
  local db = assert(sqlite.open(env.app.config.store.path))
  assert(db:exec(([[
    BEGIN;
    WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < %d)
      INSERT INTO calls (id, status, created, doc) SELECT 'c_old_' || i, 'completed', %f, '{}' FROM k;
    WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 10)
      INSERT INTO transcript (call_id, doc) SELECT c.id, '{"role":"agent","text":"x"}' FROM calls c, k;
    COMMIT;
  ]]):format(calls, core.time() - 40 * 86400)))
  db:close()
  return env.app.config
end

T.test("the prune at start removes the old calls in turns: the loop runs timers while it is half done", function()
  local cfg = old_store(4000)
  local app = assert(callagent.app(cfg, { public_url = function(u) return u end, no_shutdown_hook = true }))
  local seen_partly = 0
  local t = timer.every(1, function()
    local db = app.store and app.store.db
    local left = db and db:value("SELECT count(*) FROM calls WHERE id LIKE 'c_old_%'")
    if left and left > 0 and left < 4000 then
      seen_partly = seen_partly + 1
    end
  end)
  T.defer(function()
    t:stop()
  end)
  assert(app:start())
  T.defer(function()
    app:stop()
  end)
  T.wait_for(function()
    return app.store.db:value("SELECT count(*) FROM calls WHERE id LIKE 'c_old_%'") == 0
  end, 5000, "the old calls pruned")
  T.eq(app.store.db:value("SELECT count(*) FROM transcript"), 0, "with their rows")
  T.ge(seen_partly, 1, "timers ran between the prune's batches")
end, { timeout = 20000 })

T.test("a stop while the prune at start is under way ends it: no error, nothing written to the closed store", function()
  local cfg = old_store(4000)
  local errs = {}
  local e = log.error
  log.error = function(msg, f)
    errs[#errs + 1] = msg .. " " .. tostring(f and (f.error or f.traceback) or "")
    return e(msg, f)
  end
  T.defer(function()
    log.error = e
  end)
  local app = assert(callagent.app(cfg, { public_url = function(u) return u end, no_shutdown_hook = true }))
  assert(app:start())
  T.ok(app.store.pruning, "the prune still under way when the start returned")
  app:stop()
  timer.sleep(300)
  T.eq(errs, {}, "no error")
  local db = assert(sqlite.open(cfg.store.path))
  local left = db:value("SELECT count(*) FROM calls WHERE id LIKE 'c_old_%'")
  db:close()
  T.diag("old calls left for the next start: " .. left)
end, { timeout = 20000 })

T.run()
