--- callagent.config: the configuration, checked at start.
--
--   local config = require "callagent.config"
--   local cfg, err = config.load_file("callagent.json")   -- JSON file, seed shape
--   local cfg, err = config.normalize({ ... })             -- the same from a Lua table
--   -- cfg: every key with its default filled in; err: one message naming the
--   -- key and what is expected ("twilio.fromNumber: expected an E.164 number
--   -- like +15551234567, got '555'"). Unknown keys are logged as warnings.
--
-- Keys (defaults in brackets; * = a secret, redacted from every log line, as
-- are Twilio's Basic credential, a URL key's password and its query values
-- named like a credential: credential_name):
--   telephony.provider      name of a provider file in providers/ ["twilio"]
--   server.port [4545]      server.host ["127.0.0.1"]
--   server.publicBaseUrl    the URL the telephony vendor reaches us at (else a tunnel)
--   server.apiToken*        bearer token for the REST API; required when host is
--                           not a loopback address
--   twilio.accountSid       "AC" + 32 hex       twilio.authToken*
--   twilio.fromNumber       E.164               twilio.validateSignature [true]
--   twilio.apiBaseUrl       ["https://api.twilio.com"]
--   twilio.requestTimeoutSec [15]: how long a request to Twilio's REST API may
--                           take (a hang-up or a status lookup at most 10 s)
--   telnyx.*                the telnyx provider's own section, checked by
--                           providers/telnyx.lua when the app starts
--   openai.apiKey*          openai.model ["gpt-realtime"]   openai.voice ["alloy"]
--   openai.inputFormat      ["audio/pcmu"] (also "audio/pcma")
--   openai.outputFormat     ["audio/pcm"] or "audio/pcmu" / "audio/pcma"
--   openai.outputSampleRate [24000] (only 24000 for audio/pcm)
--   openai.realtimeUrl      ["wss://api.openai.com/v1/realtime"]
--   openai.caFile           PEM file of extra CAs for a wss:// realtimeUrl (a proxy's)
--   openai.transcriptionModel ["gpt-4o-mini-transcribe"]
--   openai.sessionMaxSec [3600]: how long the model service keeps a session
--                           (OpenAI: 60 minutes); a call wraps up before it
--                           ends, as at call.maxDurationSec. It must exceed
--                           call.wrapUpSec + call.goodbyeTimeoutSec; a
--                           maxDurationSec that does not fit in it is warned about
--   openai.connectWhileRinging [true]: open the model session as the phone
--                           rings, so the greeting does not wait for it at the answer
--   notify.hooksUrl         notify.hooksToken*    notify.sessionKey
--   defaults.timezone       ["America/Los_Angeles"]   defaults.locale ["en-US"]
--   retry.maxAttempts [3]   retry.initialDelayMs [60000]   retry.backoffFactor [2]
--   retry.retryStatuses     [["busy", "no_answer", "failed"]]
--   tunnel.provider         ["auto"]: auto | ngrok | tailscale | none
--   tunnel.timeoutSec [20]: how long opening a tunnel may take
--   tunnel.ngrokApiUrl      ["http://127.0.0.1:4040"]: ngrok's local API, used
--                           when ngrok does not log its own web address
--   call.maxDurationSec [600]  call.ringTimeoutSec [30]  call.silenceTimeoutSec [30]
--   call.statusGraceSec [30]: how long after the ring time an unanswered call
--   waits for the provider's final status before asking its API
--   call.goodbyeTimeoutSec [8]: how long the goodbye after report_call may take
--   call.wrapUpSec [20]: after asking the agent to wrap up (time is up, or the
--   callee is silent), how long it has to report before the call is hung up
--   store.backend ["sqlite"] (or "memory": nothing kept)   store.path ["./callagent.db"]
--   store.retentionDays [30]: finished calls older than this are pruned
--
-- A secret is printable ASCII without spaces (it goes into a header as is).
-- A URL key needs a valid host (IPv4, [IPv6] or a DNS name) and a port
-- 1-65535 if it has one; a base URL (publicBaseUrl, apiBaseUrl, ngrokApiUrl)
-- no query and no fragment, realtimeUrl and hooksUrl no fragment. Every string must be UTF-8.
--
-- "${NAME}" anywhere in a string value is replaced by the environment
-- variable NAME (a missing variable is an error naming the key), in the keys
-- above and in an app's own provider's section: unknown keys are not read.
local json = require "callagent.json"
local log = require "callagent.log"
local core = require "callagent.core"
local tz = require "callagent.tz"
local url = require "callagent.url"

local M = {}

local VOICES = { "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar" }
M.voices = VOICES

local function is_e164(s)
  return type(s) == "string" and s:match("^%+[1-9]%d%d%d%d%d%d+$") ~= nil and #s <= 16
end
M.is_e164 = is_e164

-- A language tag: 2-3 letters, then subtags of 1-8 letters or digits, each
-- after a "-" (or "_", as in en_US): en, en-US, es-419, zh-Hant-TW.
local function is_locale(s)
  if type(s) ~= "string" or #s > 35 then
    return false
  end
  local rest = s:match("^%a%a%a?(.*)$")
  while rest and rest ~= "" do
    local tag, after = rest:match("^[-_](%w+)(.*)$")
    if tag and #tag > 8 then
      return false
    end
    rest = after
  end
  return rest == ""
end
M.is_locale = is_locale

local function is_loopback(host)
  return host == "127.0.0.1" or host == "::1" or host == "localhost" or (host or ""):match("^127%.") ~= nil
end
M.is_loopback = is_loopback

-- A field: type ("string", "integer", "number", "boolean", "list"), default,
-- check(v) -> nil or "what is expected" (or nil, a whole complaint), secret.
local function field(t, default, check, opts)
  opts = opts or {}
  return {
    type = t,
    default = default,
    check = check,
    secret = opts.secret,
    optional = opts.optional,
    url = opts.url,
  }
end

local function one_of(list)
  return function(v)
    for _, x in ipairs(list) do
      if v == x then
        return nil
      end
    end
    return "one of " .. table.concat(list, ", ")
  end
end

-- A store backend is a module callagent.store.<name> (sqlite and memory are
-- built in; an app adds one by putting lua/callagent/store/<name>.lua, or
-- callagent/store/<name>.lua next to it, on the module path).
local function store_backend(v)
  if not v:match("^[%a_][%w_]*$") or v == "init" or not package.searchpath("callagent.store." .. v, package.path) then
    return "sqlite, memory, or the name of a module callagent.store.<name> on the module path"
  end
end

-- An IPv4 address as a dotted quad, each part 0-255.
local function is_ipv4(h)
  local parts = { h:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
  if #parts ~= 4 then
    return false
  end
  for _, x in ipairs(parts) do
    if #x > 3 or tonumber(x) > 255 then
      return false
    end
  end
  return true
end

-- An IPv6 address (without its brackets, maybe with a zone "%25eth0"):
-- eight groups of 1-4 hex digits, fewer with one "::", the last two maybe
-- a dotted quad.
local function is_ipv6(h)
  h = h:gsub("%%25.*$", "")
  local v4 = h:match(":(%d+%.%d+%.%d+%.%d+)$")
  if v4 then
    if not is_ipv4(v4) then
      return false
    end
    h = h:sub(1, #h - #v4) .. "0:0"
  end
  local function groups(part)
    if part == "" then
      return 0
    end
    local n = 0
    for g in (part .. ":"):gmatch("([^:]*):") do
      if not g:find("^%x%x?%x?%x?$") then
        return nil
      end
      n = n + 1
    end
    return n
  end
  local head, tail = h:match("^(.-)::(.*)$")
  if head then
    local a, b = groups(head), groups(tail)
    return a ~= nil and b ~= nil and a + b <= 7
  end
  return groups(h) == 8
end

-- A host a connection can be made to: an IPv4 address, an IPv6 one (from
-- brackets: url.parse keeps no ":" in a name), or a DNS name of labels of
-- letters, digits, "-" and "_" (a container's name), each 1-63 long and not
-- starting or ending with "-", maybe with a final dot. A name that ends in
-- digits is no name: "999.1.1.1" is a wrong address.
local function is_host(h)
  if h:find(":", 1, true) then
    return is_ipv6(h)
  end
  local name = h:gsub("%.$", "")
  if name == "" or #name > 253 then
    return false
  elseif name:find("^[%d.]+$") then
    return is_ipv4(name)
  elseif name:match("[^.]*$"):find("^%d+$") then
    return false
  end
  for label in (name .. "."):gmatch("([^.]*)%.") do
    if #label > 63 or not label:find("^[%w_][%w_-]*$") or label:find("-$") then
      return false
    end
  end
  return true
end

-- A URL key: one of schemes, a valid host, a port 1-65535 if given, only
-- characters a URL may hold. opts.base: a base that paths are appended to,
-- so no query and no fragment; opts.no_fragment: a query is fine (kept
-- after what is appended), a fragment would swallow it.
local function url_check(schemes, opts)
  opts = opts or {}
  return function(v)
    local scheme = v:match("^(%a[%w+.-]*)://")
    if not scheme then
      return "a URL like " .. schemes[1] .. "://host"
    end
    local known = false
    for _, s in ipairs(schemes) do
      known = known or scheme:lower() == s
    end
    if not known then
      return "a " .. table.concat(schemes, " or ") .. " URL"
    end
    if v:find("[%s%c]") then
      return "a URL without spaces or control characters"
    end
    local u, perr = url.parse(v)
    if not u and perr:find("port", 1, true) or u and u.port == 0 then
      return "a URL with a port from 1 to 65535"
    elseif not u or not is_host(u.host) then
      return "a URL with a valid host (a DNS name, an IPv4 address or an [IPv6] one)"
    end
    -- RFC 3986's characters: unreserved, reserved and "%" (a "\" is a path
    -- separator to some parsers and part of the userinfo to others).
    if v:find("[^%w%-._~:/?#%[%]@!$&'()*+,;=%%]") then
      return "a URL of letters, digits and URL punctuation (percent-encode the rest)"
    end
    if opts.base and (u.query or u.fragment) then
      return "a base URL, without a query (?...) or a fragment (#...)"
    elseif opts.no_fragment and u.fragment then
      return "a URL without a fragment (#...)"
    end
  end
end

-- A PEM file of CA certificates as OpenSSL loads it: readable, at least
-- one certificate, and each one's base64 a DER sequence (one bad block and
-- OpenSSL refuses the whole file: every wss connect would fail "ETLS").
-- Returns nil, or what is expected, or nil and the whole complaint.
local function ca_file(v)
  if core.stat(v) ~= "file" then
    return "an existing PEM file of CA certificates"
  end
  local f, err = io.open(v, "rb")
  local text = f and f:read("a")
  if f then
    f:close()
  end
  if not text then
    return nil, "cannot read " .. tostring(err or v)
  end
  local crypto = require "callagent.crypto"
  local n = 0
  for label, body in text:gmatch("%-%-%-%-%-BEGIN ([%u%d ]+)%-%-%-%-%-(.-)%-%-%-%-%-END %1%-%-%-%-%-") do
    if label:find("CERTIFICATE$") then
      n = n + 1
      local der = crypto.base64_decode((body:gsub("%s", "")))
      if not der or der:byte(1) ~= 0x30 then
        return nil, string.format("%s holds a PEM certificate that is not valid (certificate %d in the file)",
          v, n)
      end
    end
  end
  if n == 0 then
    return nil, v .. " holds no PEM certificate"
  end
end

-- What the server can listen on: it resolves no name but "localhost", so
-- an address as inet_pton(3) reads it (a dotted quad without leading zeros,
-- or IPv6 without brackets or a zone). Anything else was accepted here and
-- failed only at the start, with an error that did not name the key.
local function listen_host(v)
  if v == "localhost" then
    return nil
  end
  if is_ipv4(v) and not v:find("%f[%d]0%d") then -- inet_pton takes no leading zero
    return nil
  end
  if v:find(":", 1, true) and not v:find("[^%x:.]") and is_ipv6(v) then
    return nil
  end
  return "an IP address (IPv4 or IPv6) or localhost"
end

-- A name or a path: an empty or blank one would only fail later, less clearly.
local function not_blank(what)
  return function(v)
    return v:find("^%s*$") and what or nil
  end
end

local function range(lo, hi)
  return function(v)
    if v < lo or (hi and v > hi) then
      return hi and ("a number from " .. lo .. " to " .. hi) or ("a number >= " .. lo)
    end
  end
end

local SCHEMA = {
  telephony = {
    provider = field("string", "twilio", function(v)
      return v:match("^[%w_-]+$") == nil and "a provider name (a file in providers/)" or nil
    end),
  },
  server = {
    port = field("integer", 4545, range(0, 65535)),
    host = field("string", "127.0.0.1", listen_host),
    publicBaseUrl = field("string", nil, url_check({ "https", "http" }, { base = true }),
      { optional = true, url = true }),
    apiToken = field("string", nil, function(v)
      return #v < 16 and "a token of at least 16 characters" or nil
    end, { secret = true, optional = true }),
  },
  twilio = {
    accountSid = field("string", nil, function(v)
      if not v:match("^AC%x+$") or #v ~= 34 then
        return "AC followed by 32 hex digits"
      end
    end, { optional = true }),
    authToken = field("string", nil, nil, { secret = true, optional = true }),
    fromNumber = field("string", nil, function(v)
      return not is_e164(v) and "an E.164 number like +15551234567" or nil
    end, { optional = true }),
    validateSignature = field("boolean", true),
    apiBaseUrl = field("string", "https://api.twilio.com", url_check({ "https", "http" }, { base = true }),
      { url = true }),
    requestTimeoutSec = field("integer", 15, range(1, 120)),
  },
  openai = {
    apiKey = field("string", nil, nil, { secret = true, optional = true }),
    model = field("string", "gpt-realtime", not_blank("a model name")),
    voice = field("string", "alloy", one_of(VOICES)),
    inputFormat = field("string", "audio/pcmu", one_of({ "audio/pcmu", "audio/pcma" })),
    outputFormat = field("string", "audio/pcm", one_of({ "audio/pcm", "audio/pcmu", "audio/pcma" })),
    outputSampleRate = field("integer", 24000, one_of({ 24000 })),
    realtimeUrl = field("string", "wss://api.openai.com/v1/realtime",
      url_check({ "wss", "ws" }, { no_fragment = true }), { url = true }),
    caFile = field("string", nil, ca_file, { optional = true }),
    transcriptionModel = field("string", "gpt-4o-mini-transcribe", not_blank("a model name")),
    sessionMaxSec = field("integer", 3600, range(10, 86400)),
    connectWhileRinging = field("boolean", true),
  },
  notify = {
    hooksUrl = field("string", nil, url_check({ "https", "http" }, { no_fragment = true }),
      { optional = true, url = true }),
    hooksToken = field("string", nil, nil, { secret = true, optional = true }),
    -- Empty, it would go out in every notification as a session named "".
    sessionKey = field("string", nil, not_blank("a session key (leave the key out for none)"), { optional = true }),
  },
  defaults = {
    timezone = field("string", "America/Los_Angeles", function(v)
      return not tz.valid(v) and "an IANA time zone like Europe/Paris" or nil
    end),
    locale = field("string", "en-US", function(v)
      return not is_locale(v) and "a language tag like en-US" or nil
    end),
  },
  retry = {
    maxAttempts = field("integer", 3, range(1, 20)),
    initialDelayMs = field("integer", 60000, range(0, 86400000)),
    backoffFactor = field("number", 2, range(1, 10)),
    retryStatuses = field("list", { "busy", "no_answer", "failed" }, function(v)
      for _, s in ipairs(v) do
        if s ~= "busy" and s ~= "no_answer" and s ~= "failed" then
          return 'a list of "busy", "no_answer", "failed"'
        end
      end
    end),
  },
  tunnel = {
    provider = field("string", "auto", one_of({ "auto", "ngrok", "tailscale", "none" })),
    timeoutSec = field("integer", 20, range(1, 600)),
    ngrokApiUrl = field("string", "http://127.0.0.1:4040", url_check({ "http", "https" }, { base = true }),
      { url = true }),
  },
  call = {
    maxDurationSec = field("integer", 600, range(1, 4 * 3600)),
    ringTimeoutSec = field("integer", 30, range(1, 600)),
    statusGraceSec = field("integer", 30, range(1, 600)),
    silenceTimeoutSec = field("integer", 30, range(1, 3600)),
    goodbyeTimeoutSec = field("integer", 8, range(0, 60)),
    wrapUpSec = field("integer", 20, range(1, 600)),
  },
  store = {
    backend = field("string", "sqlite", store_backend),
    path = field("string", "./callagent.db", not_blank("a file path")),
    retentionDays = field("integer", 30, range(1, 36500)),
  },
}
M.schema = SCHEMA

-- The order keys are checked in, so that of several problems the same one is
-- reported every time: sections as documented, then any others; keys by name.
local SECTIONS = { "telephony", "server", "twilio", "openai", "notify", "defaults", "retry", "tunnel", "call", "store" }

local function ordered_keys(t, first)
  local keys, seen = {}, {}
  for _, k in ipairs(first or {}) do
    if t[k] ~= nil then
      keys[#keys + 1], seen[k] = k, true
    end
  end
  local rest = {}
  for k in pairs(t) do
    if not seen[k] then
      rest[#rest + 1] = k
    end
  end
  table.sort(rest, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then
      return ta < tb
    elseif ta == "string" or ta == "number" then
      return a < b
    end
    return tostring(a) < tostring(b)
  end)
  table.move(rest, 1, #rest, #keys + 1, keys)
  return keys
end

-- Whether t is a JSON object: a table whose keys are all strings.
local function is_object(t)
  if type(t) ~= "table" or json.is_array(t) then
    return false
  end
  for k in pairs(t) do
    if type(k) ~= "string" then
      return false
    end
  end
  return true
end

-- Replaces "${NAME}" in every string in v, at any depth; error names the key.
local function substitute(v, path)
  if type(v) == "string" then
    local missing
    local out = v:gsub("%${([%w_]+)}", function(name)
      local e = os.getenv(name)
      if e == nil then
        missing = missing or name
        return ""
      end
      return e
    end)
    if missing then
      return nil, string.format("%s: environment variable %s is not set", path, missing)
    end
    return out
  elseif type(v) == "table" then
    local out = {}
    for _, k in ipairs(ordered_keys(v)) do
      local y, err = substitute(v[k], path .. "." .. tostring(k))
      if err then
        return nil, err
      end
      out[k] = y
    end
    return out
  end
  return v
end

-- Substitutes what the config reads: the keys of the schema, and the whole
-- section of an app's own provider (its to check). An unknown key or
-- section is only warned about, "$schema" ignored: a variable unset in
-- them is no error. Of several unset, the first in the order keys are
-- checked in.
-- Whether v (a string, or a table at any depth) names a variable.
local function has_variable(v)
  if type(v) == "string" then
    return v:find("%${[%w_]+}") ~= nil
  elseif type(v) == "table" then
    for _, x in pairs(v) do
      if has_variable(x) then
        return true
      end
    end
  end
  return false
end

local function substitute_known(input)
  local raw, templates = {}, {}
  for k, v in pairs(input) do
    raw[k] = v
  end
  for _, section in ipairs(SECTIONS) do
    local fields, given = SCHEMA[section], input[section]
    if is_object(given) then
      local out = {}
      for _, name in ipairs(ordered_keys(given)) do
        local v, err = given[name], nil
        if fields[name] ~= nil then
          v, err = substitute(v, section .. "." .. name)
          if err then
            return nil, err
          end
          if has_variable(given[name]) then
            templates[section .. "." .. name] = given[name]
          end
        end
        out[name] = v
      end
      raw[section] = out
    end
  end
  local provider = is_object(raw.telephony) and raw.telephony.provider
  if type(provider) == "string" and SCHEMA[provider] == nil and is_object(input[provider]) then
    local out, err = substitute(input[provider], provider)
    if err then
      return nil, err
    end
    raw[provider] = out
  end
  return raw, nil, templates
end

-- Whether a URL's query parameter name says its value is a credential:
-- its letters end with one of these (api-key, access_token, X-Amz-Signature,
-- client_secret, sig, passphrase, jwt, sessionid), or are one of the names
-- that are a credential whole (Azure Functions' ?code=). Matched anywhere in
-- the name, "auth_mode", "design" or "tokenizer" made their values -
-- "required" - secrets, redacted from every log line.
local CREDENTIAL_ENDS = { "key", "token", "secret", "password", "passwd", "pass", "passphrase", "pwd", "auth",
  "authorization", "sig", "signature", "credential", "credentials", "jwt", "session", "sessionid" }
local CREDENTIAL_NAMES = { code = true }
local function credential_name(k)
  local letters = k:lower():gsub("[^%a]", "")
  if CREDENTIAL_NAMES[letters] then
    return true
  end
  for _, e in ipairs(CREDENTIAL_ENDS) do
    if letters:sub(-#e) == e then
      return true
    end
  end
  return false
end

-- s (redacted) shortened to about n bytes: never inside a "[redacted]",
-- which is kept whole, nor inside a UTF-8 character.
local function shorten(s, n)
  if #s <= n then
    return s
  end
  local at = 1
  while true do
    local i, j = s:find("[redacted]", at, true)
    if not i or i > n then
      break
    elseif j > n then
      n = j
      break
    end
    at = j + 1
  end
  while n > 0 and n < #s and s:byte(n + 1) & 0xC0 == 0x80 do
    n = n - 1
  end
  return n < #s and s:sub(1, n) .. "..." or s
end

-- Secrets are redacted before a long value is cut: one running past the
-- cut would no longer match whole, and its head would be shown.
local function describe(v)
  if type(v) == "string" then
    -- %q writes a newline as "\" and a line break: an error is one line.
    return (string.format("%q", shorten(log.scrub(v), 40)):gsub("\\\n", "\\n"))
  elseif type(v) == "table" then
    local ok, text = pcall(json.encode, v)
    if ok then
      return shorten(log.scrub(text), 60)
    end
    return "a table"
  end
  return tostring(v)
end

-- What a section that is no object is, without what it holds: its
-- contents may be a secret (the key written as the section, an apiToken
-- next to a stray list item), and nothing is registered with log.secret yet.
local function kind(v)
  if type(v) == "table" then
    local n = 0
    for k in pairs(v) do
      if math.type(k) ~= "integer" or k < 1 or k > #v then
        return "a table whose keys are not all names"
      end
      n = n + 1
    end
    return n > 0 and "a list" or "an empty list"
  elseif type(v) == "boolean" then
    return "true or false"
  end
  return ({ string = "a string", number = "a number" })[type(v)] or ("a " .. type(v))
end

-- template: what the config said, when a variable was substituted into v.
local function check_value(f, v, key, template)
  local t, given = f.type, v
  -- A secret's value is never shown, whatever is wrong with it; a URL's
  -- userinfo and query are not either (they may hold a password or a token).
  local describe = f.secret and function()
    return "[redacted]"
  end or f.url and function(x)
    return describe(type(x) == "string" and url.display(x) or x)
  end or describe
  if template ~= nil and not f.secret then
    -- Nor a value from the environment: the variable may be another key's
    -- secret (two names swapped), not registered yet. What was written is.
    local shown = describe
    describe = function()
      return shown(template) .. " (its value from the environment is not shown)"
    end
  end
  if t == "integer" then
    -- 4545.0 is 4545; 1e300 and inf are no integer (tointeger gives nil).
    v = type(v) == "number" and math.tointeger(v) or nil
    if not v then
      return nil, string.format("%s: expected an integer, got %s", key, describe(given))
    end
  elseif t == "number" then
    if type(v) ~= "number" or v ~= v or v == math.huge or v == -math.huge then
      return nil, string.format("%s: expected a number, got %s", key, describe(v))
    end
  elseif t == "boolean" then
    if type(v) ~= "boolean" then
      return nil, string.format("%s: expected true or false, got %s", key, describe(v))
    end
  elseif t == "list" then
    local n = type(v) == "table" and #v or 0
    local ok = type(v) == "table"
    if ok then
      for k in pairs(v) do
        if math.type(k) ~= "integer" or k < 1 or k > n then
          ok = false
          break
        end
      end
    end
    if not ok then
      return nil, string.format("%s: expected a list, got %s", key, describe(v))
    end
  elseif type(v) ~= "string" then
    return nil, string.format("%s: expected a string, got %s", key, describe(v))
  end
  if type(v) == "string" then
    -- A value goes out in JSON (a notification, session.update): bytes
    -- that are no UTF-8 would make it invalid. Only where is said: the
    -- bytes may be a secret's.
    local ok, at = utf8.len(v)
    if not ok then
      return nil, string.format("%s: expected UTF-8 text, got a string that is not at byte %d", key, at)
    end
  end
  if f.secret and v == "" then
    -- An empty key would sign Twilio's webhooks for anyone (HMAC with "").
    return nil, key .. ": expected a non-empty secret, got an empty string"
  end
  if f.secret then
    -- A secret goes into a header as is (Bearer, Basic): a newline from an
    -- env file or a Kubernetes secret would fail every call, a space every
    -- comparison. Where it is wrong is said; what it is, never.
    if v:find("^[%s%c]") or v:find("[%s%c]$") then
      return nil, key .. ": expected a secret without spaces or control characters at either end, got [redacted]"
    elseif v:find("[%s%c]") then
      return nil, key .. ": expected a secret without spaces or control characters inside, got [redacted]"
    end
    -- Nor a byte past ASCII (é, a no-break space or a zero-width one pasted
    -- with it): most HTTP clients cannot send it in a header, and one that
    -- can sends bytes the other side does not match, so every request is
    -- refused (401) without a word on why.
    local at = v:find("[\128-\255]")
    if at then
      return nil, string.format("%s: expected a secret of printable ASCII (byte %d is not), got [redacted]", key, at)
    end
  end
  if f.secret and #v < 8 then
    -- Shorter ones are guessable, and redacting them would garble the log.
    return nil, key .. ": expected a secret of at least 8 characters, got [redacted]"
  end
  if f.check then
    local want, complaint = f.check(v)
    if want then
      return nil, string.format("%s: expected %s, got %s", key, want, describe(v))
    elseif complaint then
      return nil, key .. ": " .. complaint
    end
  end
  return v
end

-- Registers every secret given (at least 8 bytes) before any key is
-- checked: the same value written at another key too is then not quoted
-- by that key's error.
local function register_secrets(raw)
  for _, section in ipairs(SECTIONS) do
    local given = raw[section]
    if is_object(given) then
      for name, f in pairs(SCHEMA[section]) do
        local v = given[name]
        if f.secret and type(v) == "string" and #v >= 8 then
          log.secret(v)
        end
      end
    end
  end
end

local check

--- Checks a config table (seed shape); returns the full config and a list of warnings.
-- The error and the warnings are scrubbed of secrets (log.scrub): an app
-- may print them with io.stderr:write, past the log's redaction.
function M.normalize(input, opts)
  local cfg, err, warnings = check(input, opts)
  if not cfg then
    return nil, log.scrub(err)
  end
  for i, w in ipairs(warnings) do
    warnings[i] = log.scrub(w)
  end
  return cfg, nil, warnings
end

function check(input, opts)
  opts = opts or {}
  if input == nil then
    input = {}
  end
  if not is_object(input) then
    return nil, "config: expected a JSON object (an object of sections such as server, twilio, openai)"
  end
  local raw, serr, templates = substitute_known(input)
  if not raw then
    return nil, serr
  end
  register_secrets(raw)
  local cfg, warnings = {}, {}
  for _, section in ipairs(SECTIONS) do
    local fields = SCHEMA[section]
    local given = raw[section]
    if given == json.null then
      given = nil
    end
    if given ~= nil and not is_object(given) then
      return nil, section .. ": expected an object, got " .. kind(given)
    end
    given = given or {}
    cfg[section] = {}
    for _, name in ipairs(ordered_keys(fields)) do
      local f = fields[name]
      local key = section .. "." .. name
      local v = given[name]
      if v == json.null then
        v = nil
      end
      if v == nil then
        v = f.default
        if type(v) == "table" then
          local copy = {}
          for i, x in ipairs(v) do
            copy[i] = x
          end
          v = copy
        end
      else
        local ok, err = check_value(f, v, key, templates[key])
        if err then
          return nil, err
        end
        v = ok
      end
      cfg[section][name] = v
      if f.secret and type(v) == "string" then
        log.secret(v)
      end
    end
    for _, name in ipairs(ordered_keys(given)) do
      if fields[name] == nil then
        warnings[#warnings + 1] = string.format("%s.%s: unknown key, ignored", section, tostring(name))
      end
    end
  end
  for _, section in ipairs(ordered_keys(raw)) do
    if section == cfg.telephony.provider and SCHEMA[section] == nil and is_object(raw[section]) then
      -- A provider of the app's own: its section is its to check (its
      -- `needs`, its init), and its secrets to register (log.secret).
      cfg[section] = raw[section]
    elseif SCHEMA[section] == nil and section ~= "$schema" then
      warnings[#warnings + 1] = string.format("%s: unknown section, ignored", tostring(section))
    end
  end

  -- Rules across keys.
  if not is_loopback(cfg.server.host) and not cfg.server.apiToken then
    return nil, "server.apiToken: required when server.host (" .. cfg.server.host .. ") is not a loopback address"
  end
  if cfg.openai.outputFormat ~= "audio/pcm" and input.openai and input.openai.outputSampleRate then
    warnings[#warnings + 1] = "openai.outputSampleRate: only used with outputFormat audio/pcm"
  end
  -- The model's session must hold at least the wrap-up (the report, then
  -- the goodbye): else every call would end cut off when it expires.
  local wrap_up = cfg.call.wrapUpSec + cfg.call.goodbyeTimeoutSec
  if cfg.openai.sessionMaxSec <= wrap_up then
    return nil, string.format("openai.sessionMaxSec: expected more than call.wrapUpSec + call.goodbyeTimeoutSec "
      .. "(%d s), got %d: a call must be able to wrap up before the model's session ends", wrap_up,
      cfg.openai.sessionMaxSec)
  end
  -- A call allowed longer than the session is still wrapped up in time,
  -- only earlier than call.maxDurationSec says.
  if cfg.call.maxDurationSec + wrap_up > cfg.openai.sessionMaxSec then
    warnings[#warnings + 1] = string.format("call.maxDurationSec (%d s) + call.wrapUpSec + call.goodbyeTimeoutSec "
      .. "is more than openai.sessionMaxSec (%d s): calls that long wrap up before the model's session ends instead",
      cfg.call.maxDurationSec, cfg.openai.sessionMaxSec)
  end
  if cfg.notify.hooksUrl and not cfg.notify.hooksToken then
    return nil, "notify.hooksToken: required when notify.hooksUrl is set"
  end
  -- Settings that send nothing, where the user meant notifications to go.
  if cfg.notify.hooksToken and not cfg.notify.hooksUrl then
    warnings[#warnings + 1] = "notify.hooksToken: set without notify.hooksUrl: no notifications are sent"
  end
  if cfg.telephony.provider == "twilio" and not cfg.twilio.validateSignature then
    warnings[#warnings + 1] = "twilio.validateSignature: false: Twilio's webhooks are not checked, and anyone who "
      .. "reaches the server can forge a call's statuses or have it hung up (for tests on loopback only)"
  end
  -- OpenAI itself needs the key (so does the stand-in: standin.KEY); a proxy or a test fake may not.
  -- The host as the connection will see it: any case, a final dot, userinfo.
  local rt = url.parse(cfg.openai.realtimeUrl)
  if not cfg.openai.apiKey and rt and rt.host:gsub("%.$", "") == "api.openai.com" then
    return nil, "openai.apiKey: required to use " .. url.display(cfg.openai.realtimeUrl)
      .. ' (for example "${OPENAI_API_KEY}")'
  end
  -- Twilio's REST requests carry "Authorization: Basic base64(sid:token)":
  -- a vendor or a proxy that echoes the header quotes the token in a form
  -- the token itself does not match.
  if cfg.twilio.accountSid and cfg.twilio.authToken then
    local crypto = require "callagent.crypto"
    log.secret(crypto.base64_encode(cfg.twilio.accountSid .. ":" .. cfg.twilio.authToken))
  end
  -- A URL's password (user:pass@, or a lone token@), and a query value
  -- named like a credential (?api-key=, ?token=): a vendor quoting the URL
  -- in an error (Twilio's "Url is not a valid URL: ...") quotes them too.
  for _, section in ipairs(SECTIONS) do
    for _, name in ipairs(ordered_keys(SCHEMA[section])) do
      local u = SCHEMA[section][name].url and cfg[section][name] and url.parse(cfg[section][name])
      if u then
        local pass = u.userinfo and (u.userinfo:match("^[^:]*:(.*)$") or u.userinfo)
        local values = { pass }
        for k, v in (u.query or ""):gmatch("([^&=]+)=([^&]*)") do
          if credential_name(k) then
            values[#values + 1] = v
          end
        end
        for _, v in pairs(values) do
          for _, form in ipairs({ v, url.decode(v) }) do
            if #form >= 8 then
              log.secret(form)
            end
          end
        end
      end
    end
  end
  if cfg.server.publicBaseUrl then
    -- The scheme in lower case: the stream URL is this one with "^http"
    -- made "ws" (HTTPS:// stayed HTTPS://, which no vendor streams to).
    local u = cfg.server.publicBaseUrl:gsub("/+$", "")
    cfg.server.publicBaseUrl = u:gsub("^%a+:", string.lower)
  end
  cfg.twilio.apiBaseUrl = cfg.twilio.apiBaseUrl:gsub("/+$", "")
  if cfg.notify.hooksUrl then
    -- From the path only: a query is the receiver's, sent as given.
    local path, query = cfg.notify.hooksUrl:match("^([^?]*)(.*)$")
    path = path:gsub("/+$", "")
    cfg.notify.hooksUrl = path .. query
    -- The receiver's whole URL given (the seed's is ".../hooks"): every
    -- notification would go to .../agent/agent, refused (404), and never
    -- sent again. Kept as given (a receiver may really want that), said.
    if path:find("/agent$") then
      warnings[#warnings + 1] = string.format("notify.hooksUrl: ends in /agent, and /agent is appended to it: "
        .. "notifications go to %s (set it to %s)", url.display(path .. "/agent" .. query),
        url.display(path:gsub("/agent$", "") .. query))
    end
  end

  -- A secret sent in clear text to another machine: said, not refused (a
  -- private network, a sidecar container), since anyone on the way reads it.
  local function cleartext(key, secret_key, scheme)
    local section, name = key:match("^(%w+)%.(%w+)$")
    local u = cfg[section][name] and url.parse(cfg[section][name])
    local s2, n2 = secret_key:match("^(%w+)%.(%w+)$")
    if u and cfg[s2][n2] and u.scheme == scheme and not is_loopback(u.host) then
      warnings[#warnings + 1] = string.format("%s: %s:// to %s, another machine: %s goes over the network unencrypted",
        key, scheme, u.host, secret_key)
    end
  end
  cleartext("twilio.apiBaseUrl", "twilio.authToken", "http")
  cleartext("openai.realtimeUrl", "openai.apiKey", "ws")
  cleartext("notify.hooksUrl", "notify.hooksToken", "http")

  if not opts.quiet then
    for _, w in ipairs(warnings) do
      log.warn("config: " .. w)
    end
  end
  return cfg, nil, warnings
end

--- Reads a JSON config file and normalizes it.
function M.load_file(path)
  local f, ferr = io.open(path, "rb")
  if not f then
    -- io.open's message starts with the path: said once, not twice.
    ferr = tostring(ferr)
    if ferr:sub(1, #path + 2) == path .. ": " then
      ferr = ferr:sub(#path + 3)
    end
    return nil, "config: cannot read " .. path .. ": " .. ferr
  end
  local text, rerr = f:read("a") -- nil for a directory, which opens
  f:close()
  if not text then
    return nil, "config: cannot read " .. path .. ": " .. tostring(rerr)
  end
  -- A UTF-8 byte order mark at the start (Notepad) is read past, as the API
  -- does with a body (it was "not valid JSON: ... at character 1").
  local v, err = json.try_decode(json.without_bom(text))
  if not v then
    return nil, "config: " .. path .. " is not valid JSON: " .. err:gsub("^EJSON: ", "")
  end
  return M.normalize(v)
end

--- Checks what a provider needs from the config (used by provider files).
function M.require_keys(cfg, keys, why)
  for _, key in ipairs(keys) do
    local section, name = key:match("^([^.]+)%.(.+)$")
    if cfg[section] == nil or cfg[section][name] == nil then
      return nil, string.format("%s: required %s", key, why or "")
    end
  end
  return true
end

return M
