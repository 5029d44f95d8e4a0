--- callagent.providers: telephony vendors, one Lua file each, found at start.
--
-- A provider file (providers/<name>.lua, in callagent's own providers/ folder
-- or in a providers/ folder next to the app) returns a table:
--
--   name                      the provider's name, a non-empty string (defaults
--                             to the file name)
--   needs                     config keys it requires, e.g. {"twilio.accountSid"}
--   needs_public_url          true when the vendor must reach us (webhooks, media)
--   requestHeaders            names of headers of its own that validateRequest
--                             reads, e.g. {"x-twilio-signature"}: the
--                             /voice/stream upgrade's req.headers holds only
--                             the headers libwebsockets knows, and these
--   init(self, ctx)           optional; ctx = {config, engine, app, log}
--   startCall(self, call, publicBaseUrl, localBaseUrl)
--                             -> {providerCallId, userHint, queueMs} | nil, err
--                             (may wait; queueMs: how long the vendor will keep
--                             the call in its queue before it rings, the ring
--                             timeout counting from then)
--                             | nil, err, {permanent = true}: refused for good
--                             (the number, the account): failed, not retried
--   buildVoiceResponse(self, callId, publicBaseUrl, stream)
--                             -> body, content_type   (stream = {url, parameters})
--   validateRequest(self, req, publicBaseUrl) -> true | false, reason, field?
--                             (field: the header at fault, as a 403 names it)
--   mapStatus(self, payload)  -> {status, providerCallId?, sequence?, reason?, raw?,
--                             duration?} | nil, err, field? (the payload field at fault)
--                             status: "dialing" | "in_progress" | "completed" |
--                             "busy" | "no_answer" | "failed" | "canceled"
--                             (the word alone is {status = word}: the seed's
--                             CallStatus; another word is a 500 and an error);
--                             providerCallId: the vendor's id of that call (how
--                             a lost dial answer's id is learnt, and a call
--                             unknown here hung up); sequence: grows per
--                             callback (older ones ignored); raw: the vendor's
--                             status word (kept in the events)
--   registerRoutes(self, server, ctx)   extra routes (may do nothing)
--   endCall(self, call, attempt)        optional: hang up at the vendor (may wait)
--                                        -> true | nil, err. Without it a hang-up
--                                        closes the call's media stream, which
--                                        ends the call where the voice answer
--                                        has nothing after the stream (Twilio's
--                                        <Connect><Stream> does so); a call not
--                                        streaming yet cannot be hung up then
--   getCall(self, providerCallId)       optional: the vendor's view of the call
--                                        -> {status, duration, queued} | nil, err
--                                        (queued: not placed yet, in the
--                                        vendor's queue; nothing rang)
--   streamStart(self, ev)               optional: the media stream's decoded `start`
--                                        -> {streamSid, parameters = {callId,
--                                        attempt?, token}, providerCallId?} |
--                                        nil, why (providerCallId: the call the
--                                        stream says it is of; another than
--                                        the attempt's, once known, is
--                                        refused). Without
--                                        it, Twilio's shape: ev.streamSid and
--                                        ev.start.customParameters
--   streamEndsCall                      optional: false when the vendor keeps a
--                                        call up after its media stream closes
--                                        (Telnyx): the engine hangs it up then
--   cancelEndsAnswered                  optional: true when the vendor's cancel
--                                        of a ringing call ends it also once
--                                        the callee answered (Telnyx's one
--                                        hang-up); Twilio's leaves it up
--   close(self)                         optional: app:stop() calls it; it stops
--                                        the provider's timers (nothing of the
--                                        app may run after the stop)
--
-- The call flow is the same for every vendor: POST /voice answers with
-- buildVoiceResponse, POST /status goes through mapStatus, and the audio
-- arrives on WS /voice/stream speaking Twilio's Media Streams protocol (or a
-- vendor's like it: its `start` read by the provider's streamStart).
local core = require "callagent.core"
local task = require "callagent.task"

local M = {}

M.required = {
  "startCall",
  "buildVoiceResponse",
  "validateRequest",
  "mapStatus",
  "registerRoutes",
}

-- Optional, but functions when given.
M.optional = { "init", "endCall", "getCall", "streamStart", "close" }
-- Its other fields the engine reads.
M.fields = { "name", "needs", "needs_public_url", "requestHeaders", "streamEndsCall", "cancelEndsAnswered" }

--- The folders searched, in order: extra dirs (opts.provider_dirs), the
--- providers/ folder next to the app being run, then callagent's own.
--- A provider_dirs that is no list of strings is nil, err: a string given
--- for a list would be read as an empty one, and the provider it holds
--- reported as not found.
function M.dirs(extra)
  local dirs = {}
  if extra ~= nil and type(extra) ~= "table" then
    return nil, "provider_dirs: must be a list of folders, not a " .. type(extra)
  end
  for i, d in ipairs(extra or {}) do
    if type(d) ~= "string" or d == "" then
      return nil, "provider_dirs[" .. i .. "]: must be a folder's path, not " .. (d == "" and "empty" or "a " .. type(d))
    end
    dirs[#dirs + 1] = d
  end
  local own = core.root .. "/providers"
  if core.app_dir and core.app_dir ~= "" then
    local mine = core.app_dir .. "/providers"
    if mine ~= own then
      dirs[#dirs + 1] = mine
    end
  end
  dirs[#dirs + 1] = own
  return dirs
end

--- name -> path of every provider file found (the first folder wins), or
--- nil, err for a bad provider_dirs.
function M.list(extra)
  local dirs, err = M.dirs(extra)
  if not dirs then
    return nil, err
  end
  local found = {}
  for _, dir in ipairs(dirs) do
    local names = core.listdir(dir)
    for _, f in ipairs(names or {}) do
      local name = f:match("^([%w_-]+)%.lua$")
      if name and not found[name] then
        found[name] = dir .. "/" .. f
      end
    end
  end
  return found
end

-- An error value as text, even one whose __tostring raises.
local function as_text(v)
  local ok, s = pcall(tostring, v)
  return ok and type(s) == "string" and s or "(error object is a " .. type(v) .. " value)"
end

local check

--- Loads and checks one provider file: the table, or nil and a message naming
--- the file. It never raises: what the file's table does when read (a
--- metatable's __index that raises) is an error naming the file too.
function M.load_file(path, name)
  local chunk, err = loadfile(path)
  if not chunk then
    return nil, "provider " .. path .. ": " .. as_text(err)
  end
  -- In a coroutine of its own: a file that waits (yields) while it loads
  -- would otherwise suspend the task creating the app, for good.
  local co = coroutine.create(chunk)
  local ok, p = coroutine.resume(co)
  if ok and coroutine.status(co) ~= "dead" then
    -- Closed as a task: what it waits for (a timer) may still wake it.
    task.close(co)
    ok, p = false, "it waits (yields) while loading: a provider file is run when the app is created, and may not wait"
  end
  if not ok then
    -- An error leaves the coroutine's stack as it was: its to-be-closed
    -- variables are closed now, as a pcall would have (an error in one of
    -- them is the error then, as with a pcall).
    local _, cerr = coroutine.close(co)
    if cerr ~= nil then
      p = cerr
    end
    return nil, "provider " .. path .. ": error while loading: " .. as_text(p)
  end
  local cok, res, cerr = pcall(check, p, path, name)
  if not cok then
    return nil, "provider " .. path .. ": error while checking it: " .. as_text(res)
  end
  return res, cerr
end

-- Whether t is a list (keys 1..n, no hole) of strings matching pattern. A
-- hole (a misspelt constant is nil) would end ipairs there, and the rest
-- be passed over without a word (needs), or refused by the server only
-- when the app starts (requestHeaders: "option 'headers' must be an array").
local function list_of(t, pattern)
  if type(t) ~= "table" then
    return false
  end
  local n = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" then
      return false
    end
    n = n + 1
  end
  for i = 1, n do
    if type(t[i]) ~= "string" or not t[i]:match(pattern) then
      return false
    end
  end
  return true
end

check = function(p, path, name)
  if type(p) ~= "table" then
    return nil, "provider " .. path .. ": must return a table, returned " .. type(p)
  end
  -- A name the engine reads, written in another case ("endcall"), would
  -- never be called: a typo, said as one.
  local by_lower = {}
  for k in pairs(p) do
    if type(k) == "string" then
      by_lower[k:lower()] = k
    end
  end
  for _, list in ipairs({ M.required, M.optional, M.fields }) do
    for _, f in ipairs(list) do
      local k = by_lower[f:lower()]
      if k and p[f] == nil then
        return nil, "provider " .. path .. ": " .. k .. ": no such name (did you mean " .. f .. "?)"
      end
    end
  end
  local missing = {}
  for _, f in ipairs(M.required) do
    if type(p[f]) ~= "function" then
      missing[#missing + 1] = f
    end
  end
  if #missing > 0 then
    return nil, "provider " .. path .. ": missing " .. table.concat(missing, ", ")
      .. " (a provider must implement " .. table.concat(M.required, ", ") .. ")"
  end
  for _, f in ipairs(M.optional) do
    if p[f] ~= nil and type(p[f]) ~= "function" then
      return nil, "provider " .. path .. ": " .. f .. " must be a function, not a " .. type(p[f])
    end
  end
  for _, f in ipairs({ "needs_public_url", "streamEndsCall", "cancelEndsAnswered" }) do
    if p[f] ~= nil and type(p[f]) ~= "boolean" then
      return nil, "provider " .. path .. ": " .. f .. " must be true or false, not a " .. type(p[f])
    end
  end
  if p.needs ~= nil and not list_of(p.needs, "^[^.]+%..+$") then
    return nil, "provider " .. path .. ': needs must be a list of config keys like {"twilio.accountSid"}'
  end
  -- Header names: the server copies them for the /voice/stream upgrade.
  if p.requestHeaders ~= nil and not list_of(p.requestHeaders, "^[%w!#$%%&'*+.^_`|~-]+$") then
    return nil, "provider " .. path .. ': requestHeaders must be a list of header names like {"x-twilio-signature"}'
  end
  -- The name goes into messages ("the <name> provider's ..."): text.
  if p.name ~= nil and (type(p.name) ~= "string" or p.name == "") then
    return nil, "provider " .. path .. ": name must be a non-empty string, not "
      .. (p.name == "" and "empty" or "a " .. type(p.name))
  end
  p.name = p.name or name
  p.path = path
  return p
end

--- Loads the provider named in config (telephony.provider) and checks its config needs.
function M.load(name, cfg, extra)
  local all, lerr = M.list(extra)
  if not all then
    return nil, lerr
  end
  local path = all[name]
  if not path then
    local names = {}
    for n in pairs(all) do
      names[#names + 1] = n
    end
    table.sort(names)
    return nil, string.format("telephony.provider: no provider named '%s' (found: %s)", name,
      #names > 0 and table.concat(names, ", ") or "none")
  end
  local p, err = M.load_file(path, name)
  if not p then
    return nil, err
  end
  for _, key in ipairs(p.needs or {}) do
    local section, field = key:match("^([^.]+)%.(.+)$")
    if not cfg[section] or cfg[section][field] == nil then
      return nil, string.format("%s: required by the %s provider", key, p.name)
    end
  end
  -- A fresh instance per app: the file's table is the class.
  return setmetatable({}, { __index = p })
end

return M
