--- callagent.store: where calls live. store.open(cfg.store) picks the backend.
--
-- The interface every backend implements (the call flow uses nothing else, so
-- a networked backend can be added without touching it). Records are plain
-- tables and every getter returns a copy.
--
--   store:insert_call(call)                  a new call record (see lua/callagent/calls.lua);
--                                            call._idempotency = {key, fingerprint}, when
--                                            given, is kept with it (and goes with it)
--   store:find_idempotent(key) -> {call_id, fingerprint} | nil   optional: the call
--                                            created with that Idempotency-Key
--   store:update_call(id, fields)            set fields (store.NULL clears one)
--   store:get_call(id) -> call | nil         with attempts, transcript and events;
--                                            nil, err when the read failed
--   store:transcript(id) -> lines            a call's transcript lines, oldest first ({} if none);
--                                            nil, err when the read failed
--   store:list_calls{status, limit, cursor} -> calls, next_cursor   newest first;
--                                            nil, "ECURSOR: ..." for a cursor it did not give;
--                                            limit 0: an empty page (so for pending_notifications)
--   store:active_calls() -> calls            queued, dialing or in_progress (nil, err when
--                                            the read failed; so for due_retries and
--                                            pending_notifications)
--   store:add_attempt(id, attempt)           store:update_attempt(id, n, fields): nil,
--                                            "ENOENT: ..." for an attempt it does not have;
--                                            fields may hold the engine's own (named "_...",
--                                            _modelRefused, _cancelUnconfirmed, _ringCanceledBy), kept with
--                                            the attempt and read back as any (the API
--                                            never shows them; a store from before one
--                                            was written has none: no migration)
--   store:add_transcript(id, line)           store:add_event(id, event)
--   store:set_retry(id, due_at)  store:clear_retry(id)  store:due_retries() -> {{call_id, due_at}}
--   store:add_notification(key, call_id, payload) -> false when key exists
--   store:mark_notified(key, state, err, under)  state: "sent", "failed" (send again after a
--                                            restart) or "refused" (the receiver said no: never again);
--                                            under, with "refused": the fingerprint of the config
--                                            it was refused under (401/403/404), nil otherwise
--   store:requeue_refused(fingerprint) -> n  optional: those refused under a fingerprint
--                                            other than this one are pending again (and
--                                            lose it); nil, err when the store refused it.
--                                            Without it (or the under above), refused is for good
--   store:pending_notifications(opts)        neither sent nor refused, oldest first
--                                            ({key, payload, ...}); without opts all of them;
--                                            opts.limit: a page of at most that many, and the
--                                            next page's cursor (nil after the last), which
--                                            opts.after takes (keyset: a row recorded
--                                            meanwhile is in a later page, never in two);
--                                            opts.keys: only those keys (no paging)
--   store:prune(days) -> removed             store:close()
--                                            prune: nil, err when the store refused
--                                            it; called in a task, it may take turns
--                                            with the loop (task.pace) and must then
--                                            end quietly if the store closes meanwhile
--   store:batch(fn)                          optional: runs fn, whose writes commit
--                                            together (fn does not yield); without it
--                                            the engine makes them one by one
--
-- Every write is durable when it returns (for backends that persist); in a
-- batch, when the batch returns.
-- A failure is nil, err, not a raise: the engine takes a raise inside its
-- commits, and the notifier any, as a refused write (logged), but elsewhere
-- it ends the request or callback that wrote.
local M = {}

function M.open(cfg)
  cfg = cfg or { backend = "memory" }
  local name = "callagent.store." .. tostring(cfg.backend)
  if not package.searchpath(name, package.path) then
    return nil, "store.backend: unknown backend '" .. tostring(cfg.backend) .. "' (no module " .. name .. ")"
  end
  -- A backend that fails to load is a bug to see whole, not an unknown name.
  return require(name).open(cfg)
end

M.NULL = require("callagent.store.memory").NULL

--- store:method(...), where a store that raises (a backend's way to say
--- "disk full", or a bug in one) is one that failed: logged (ERROR the store
--- raised what=<method>), nil, err. The engine and the notifier call it so
--- outside a commit: raised up, it ended their work half done.
function M.call(store, method, ...)
  local res = table.pack(pcall(store[method], store, ...))
  if not res[1] then
    require("callagent.log").error("the store raised", { what = method, error = tostring(res[2]) })
    -- Never nil, err nil: to a read that is "none" (a call that exists
    -- answered 404, an Idempotency-Key sent again dialed again).
    return nil, res[2] == nil and ("the store raised in " .. method) or res[2]
  end
  return table.unpack(res, 2, res.n)
end

return M
