-- Configuration: the seed's keys and defaults, additions, validation that
-- names the key, ${ENV} substitution, unknown keys warned about, secrets redacted.
local T = require "testing"
local config = require "callagent.config"

local function good()
  return {
    telephony = { provider = "twilio" },
    server = { port = 4545, publicBaseUrl = "https://example.ngrok.app/" },
    twilio = { accountSid = "AC" .. string.rep("a", 32), authToken = "tw-token-for-tests", fromNumber = "+15551234567", validateSignature = true },
    openai = { apiKey = "sk-test-key", model = "gpt-realtime", voice = "alloy", inputFormat = "audio/pcmu", outputFormat = "audio/pcm", outputSampleRate = 24000 },
    notify = { hooksUrl = "http://127.0.0.1:19000/hooks", hooksToken = "hook-token", sessionKey = "optional" },
    defaults = { timezone = "America/Los_Angeles", locale = "en-US" },
    retry = { maxAttempts = 3, initialDelayMs = 60000, backoffFactor = 2, retryStatuses = { "busy", "no_answer", "failed" } },
    tunnel = { provider = "auto" },
  }
end

T.test("the seed's example config is accepted as is, with defaults filled in", function()
  local cfg, err, warnings = config.normalize(good(), { quiet = true })
  T.ok(cfg, err)
  T.eq(#warnings, 0)
  T.eq(cfg.server.host, "127.0.0.1")
  T.eq(cfg.server.publicBaseUrl, "https://example.ngrok.app", "trailing slash trimmed")
  local c = good()
  c.notify.hooksUrl = "http://127.0.0.1:19000/hooks/?next=/"
  T.eq(config.normalize(c, { quiet = true }).notify.hooksUrl, "http://127.0.0.1:19000/hooks?next=/",
    "the path's trailing slash trimmed, the receiver's query kept as given")
  T.eq(cfg.twilio.apiBaseUrl, "https://api.twilio.com")
  T.eq(cfg.twilio.requestTimeoutSec, 15)
  T.eq(cfg.call.statusGraceSec, 30)
  T.eq(cfg.openai.realtimeUrl, "wss://api.openai.com/v1/realtime")
  T.eq(cfg.call.maxDurationSec, 600)
  T.eq(cfg.retry.retryStatuses, { "busy", "no_answer", "failed" })
end)

T.test("a config with only the OpenAI key gets every default", function()
  local cfg = assert(config.normalize({ openai = { apiKey = "sk-test-key" } }, { quiet = true }))
  T.eq(cfg.telephony.provider, "twilio")
  T.eq(cfg.server.port, 4545)
  T.eq(cfg.openai.voice, "alloy")
  T.eq(cfg.openai.outputFormat, "audio/pcm")
  T.eq(cfg.openai.outputSampleRate, 24000)
  T.eq(cfg.defaults.locale, "en-US")
  T.eq(cfg.retry.maxAttempts, 3)
  T.eq(cfg.retry.initialDelayMs, 60000)
  T.eq(cfg.tunnel.provider, "auto")
end)

T.test("invalid values are errors naming the key and what is expected", function()
  local cases = {
    { { twilio = { fromNumber = "555" } }, "^twilio%.fromNumber: expected an E%.164 number" },
    { { twilio = { accountSid = "AC123" } }, "^twilio%.accountSid: expected AC followed by 32 hex digits" },
    { { server = { port = "80" } }, "^server%.port: expected an integer" },
    { { server = { port = 70000 } }, "^server%.port: expected a number from 0 to 65535" },
    { { twilio = { requestTimeoutSec = 0 } }, "^twilio%.requestTimeoutSec: expected a number from 1 to 120" },
    { { openai = { voice = "robot" } }, "^openai%.voice: expected one of alloy" },
    { { openai = { outputFormat = "audio/mp3" } }, "^openai%.outputFormat: expected one of" },
    { { defaults = { timezone = "Mars/Olympus" } }, "^defaults%.timezone: expected an IANA time zone" },
    { { retry = { retryStatuses = { "busy", "exploded" } } }, "^retry%.retryStatuses: expected a list of" },
    { { twilio = { validateSignature = "yes" } }, "^twilio%.validateSignature: expected true or false" },
    { { openai = { realtimeUrl = "http://x" } }, "^openai%.realtimeUrl: expected a wss or ws URL" },
    { { server = "x" }, "^server: expected an object" },
    { { server = { host = "0.0.0.0" } }, "^server%.apiToken: required when server%.host" },
    { { notify = { hooksUrl = "http://127.0.0.1:1/hooks" } }, "^notify%.hooksToken: required" },
    { { openai = { model = "gpt-realtime" } }, "^openai%.apiKey: required to use wss://api%.openai%.com/v1/realtime" },
    -- OpenAI's host however the URL spells it.
    { { openai = { realtimeUrl = "wss://API.OpenAI.com/v1/realtime" } }, "^openai%.apiKey: required to use" },
    { { openai = { realtimeUrl = "wss://api.openai.com" } }, "^openai%.apiKey: required to use" },
    { { openai = { realtimeUrl = "wss://api.openai.com./v1/realtime" } }, "^openai%.apiKey: required to use" },
    { { openai = { realtimeUrl = "wss://x@api.openai.com/v1/realtime" } }, "^openai%.apiKey: required to use" },
    -- "Keep forever" as a huge number: refused, not wrapped into a cutoff
    -- in the future that prunes every call.
    { { store = { retentionDays = 999999999999999 } }, "^store%.retentionDays: expected a number from 1 to 36500" },
    { { store = { backend = "postgres" } }, "^store%.backend: expected sqlite, memory, or the name of a module" },
    { { retry = { retryStatuses = { busy = true } } }, '^retry%.retryStatuses: expected a list, got {"busy":true}$' },
    { { retry = { retryStatuses = { "busy", "exploded" } } }, '^retry%.retryStatuses: expected a list of .* got %["busy","exploded"%]$' },
    -- Whole numbers too large for an integer, and what is no number.
    { { server = { port = 1e300 } }, "^server%.port: expected an integer, got 1e%+300$" },
    { { server = { port = math.huge } }, "^server%.port: expected an integer, got inf$" },
    { { retry = { initialDelayMs = -math.huge } }, "^retry%.initialDelayMs: expected an integer" },
    { { retry = { initialDelayMs = 86400001 } }, "^retry%.initialDelayMs: expected a number from 0 to 86400000" },
    { { retry = { backoffFactor = math.huge } }, "^retry%.backoffFactor: expected a number, got inf$" },
    { { retry = { backoffFactor = 0 / 0 } }, "^retry%.backoffFactor: expected a number" },
    { { defaults = { locale = "en-" } }, "^defaults%.locale: expected a language tag like en%-US" },
    { { defaults = { locale = "english" } }, "^defaults%.locale: expected a language tag" },
    -- A secret is never shown, and never empty (Twilio's signatures would
    -- then be anyone's to make).
    { { server = { apiToken = 1234567890123456789 } }, "^server%.apiToken: expected a string, got %[redacted%]$" },
    { { twilio = { authToken = { "my-real-twilio-token" } } }, "^twilio%.authToken: expected a string, got %[redacted%]$" },
    { { twilio = { authToken = "" } }, "^twilio%.authToken: expected a non%-empty secret" },
    { { openai = { apiKey = "" } }, "^openai%.apiKey: expected a non%-empty secret" },
    { { notify = { hooksToken = "2026" } }, "^notify%.hooksToken: expected a secret of at least 8 characters, got %[redacted%]$" },
    -- A list where an object belongs.
    { { 1, 2 }, "^config: expected a JSON object" },
    { { server = { 4545 } }, "^server: expected an object, got a list$" },
  }
  for _, c in ipairs(cases) do
    local cfg, err = config.normalize(c[1], { quiet = true })
    T.eq(cfg, nil)
    T.match(err, c[2])
  end
end)

T.test("a secret with a space or a control character is refused, saying where but not what", function()
  local cases = {
    -- An env file's or a Kubernetes secret's newline: every call would fail.
    { "openai", "apiKey", "sk-test-key-123\n", "at either end" },
    { "twilio", "authToken", "0123456789abcdef0123456789abcdef\n", "at either end" },
    -- The server trims header values: every request would be 401.
    { "server", "apiToken", "0123456789abcdef ", "at either end" },
    { "server", "apiToken", "\t0123456789abcdef", "at either end" },
    -- A header injected into every notification.
    { "notify", "hooksToken", "hooks-token-x\r\nX-Evil: yes", "inside" },
    { "openai", "apiKey", "Bearer sk-test-key-123", "inside" },
    { "openai", "apiKey", "sk-test\0key-123", "inside" },
    { "openai", "apiKey", "sk-test\127key-123", "inside" },
  }
  for _, c in ipairs(cases) do
    local section, name, value, where = c[1], c[2], c[3], c[4]
    local t = { openai = { apiKey = "sk-test-key" }, [section] = { [name] = value } }
    local cfg, err = config.normalize(t, { quiet = true })
    T.eq(cfg, nil, section .. "." .. name)
    T.eq(err, string.format("%s.%s: expected a secret without spaces or control characters %s, got [redacted]", section, name, where))
    T.no_match(err, "0123456789")
    T.no_match(err, "sk%-test")
    T.no_match(err, "hooks%-token")
  end
  -- Punctuation is no space: tokens of any alphabet stay accepted.
  local cfg, err = config.normalize({ openai = { apiKey = "sk-proj_a+b/c=d~e.f" }, server = { apiToken = "abc!#$%&*+-./:;<=>?@^_`|~xyz" } }, { quiet = true })
  T.ok(cfg, err)
end)

T.test("a secret with a byte past ASCII is refused, saying at which byte but not what: no header could carry it", function()
  local cases = {
    -- A token with an accent: valid UTF-8, no space, no control character.
    { "server", "apiToken", "0123456789abcdé0", 15 },
    -- A no-break space (U+00A0) pasted at the end, which %s does not see.
    { "server", "apiToken", "0123456789abcdef\194\160", 17 },
    -- A zero-width space (U+200B) inside.
    { "openai", "apiKey", "sk-test\226\128\139key-123", 8 },
    { "notify", "hooksToken", "hooks-token-\195\169x", 13 },
    { "twilio", "authToken", "\194\1600123456789abcdef0123456789abcdef", 1 },
  }
  for _, c in ipairs(cases) do
    local section, name, value, at = c[1], c[2], c[3], c[4]
    local t = { openai = { apiKey = "sk-test-key" }, [section] = { [name] = value } }
    local cfg, err = config.normalize(t, { quiet = true })
    T.eq(cfg, nil, section .. "." .. name)
    T.eq(err, string.format("%s.%s: expected a secret of printable ASCII (byte %d is not), got [redacted]", section, name, at))
    T.no_match(err, "0123456789")
    T.no_match(err, "sk%-test")
    T.no_match(err, "hooks%-token")
  end
end)

T.test("a URL in an error shows no userinfo and no query: they may hold a password or a token", function()
  local url = require "callagent.url"
  T.eq(url.display("wss://u:pw@h.example/v1?key=x#f"), "wss://[redacted]@h.example/v1?[redacted]#[redacted]")
  T.eq(url.display("https://h.example/hooks"), "https://h.example/hooks")
  T.eq(url.display("https://h.example/?"), "https://h.example/?")
  T.eq(url.display("https://user:pa/ss@h.example/x"), "https://[redacted]@h.example/x")
  T.eq(url.display("user:pass@h.example"), "[redacted]@h.example")
  local cases = {
    { { notify = { hooksUrl = "ftp://user:secretpass@h/x?token=abc", hooksToken = "hooks-token" } },
      'notify.hooksUrl: expected a https or http URL, got "ftp://[redacted]@h/x?[redacted]"' },
    { { openai = { realtimeUrl = "wss://u:supersecret@api.openai.com/v1/realtime" } },
      'openai.apiKey: required to use wss://[redacted]@api.openai.com/v1/realtime (for example "${OPENAI_API_KEY}")' },
    { { openai = { realtimeUrl = "wss://api.openai.com/v1/realtime?api-key=supersecret" } },
      'openai.apiKey: required to use wss://api.openai.com/v1/realtime?[redacted] (for example "${OPENAI_API_KEY}")' },
    { { openai = { apiKey = "sk-test-key" }, server = { publicBaseUrl = "mailto:supersecret@h" } },
      'server.publicBaseUrl: expected a URL like https://host, got "[redacted]@h"' },
  }
  for _, c in ipairs(cases) do
    local cfg, err = config.normalize(c[1], { quiet = true })
    T.eq(cfg, nil)
    T.eq(err, c[2])
    T.no_match(err, "secret")
    T.no_match(err, "abc")
  end
end)

T.test("a URL key needs a valid host and port, and a base URL no query or fragment: what is appended would land in them", function()
  local host = "expected a URL with a valid host %(a DNS name, an IPv4 address or an %[IPv6%] one%)"
  local port = "expected a URL with a port from 1 to 65535"
  local base = "expected a base URL, without a query %(%?%.%.%.%) or a fragment %(#%.%.%.%)"
  local frag = "expected a URL without a fragment %(#%.%.%.%)"
  local chars = "expected a URL of letters, digits and URL punctuation %(percent%-encode the rest%)"
  local cases = {
    -- Twilio would be sent ".../?x=1/voice?callId=...": no call would stream.
    { "server", "publicBaseUrl", "http://127.0.0.1:4545/?x=1", base },
    { "server", "publicBaseUrl", "http://127.0.0.1:4545#frag", base },
    { "server", "publicBaseUrl", "https://h.example/?", base },
    { "server", "publicBaseUrl", "https://<public-host>", host },
    { "server", "publicBaseUrl", "https://exa mple.com", "expected a URL without spaces or control characters" },
    { "server", "publicBaseUrl", "https://example.com\n", "expected a URL without spaces or control characters" },
    { "server", "publicBaseUrl", "https://host:99999", port },
    { "server", "publicBaseUrl", "https://host:0", port },
    { "server", "publicBaseUrl", "https://999.1.1.1", host },
    { "server", "publicBaseUrl", "https://10.0.0.256", host },
    { "server", "publicBaseUrl", "https://host.123", host },
    { "server", "publicBaseUrl", "https://a..b", host },
    { "server", "publicBaseUrl", "https://-a.example", host },
    { "server", "publicBaseUrl", "https://%61.example", host },
    { "server", "publicBaseUrl", "https://[:::1]", host },
    { "server", "publicBaseUrl", "https://[1:2:3:4:5:6:7:8:9]", host },
    { "server", "publicBaseUrl", "https://h.example/a{b}", chars },
    { "server", "publicBaseUrl", "https://b\xc3\xbccher.example", host },
    { "server", "publicBaseUrl", "https://h.example/b\xc3\xbccher", chars },
    { "twilio", "apiBaseUrl", "https://api.twilio.com?x=1", base },
    { "tunnel", "ngrokApiUrl", "http://127.0.0.1:4040/#x", base },
    -- "?model=" would land in the fragment.
    { "openai", "realtimeUrl", "wss://x.example/v1#frag", frag },
    { "openai", "realtimeUrl", "wss://api.openai.com\\@x.example/", chars },
    { "notify", "hooksUrl", "https://h.example/hooks#x", frag },
    { "notify", "hooksUrl", "https://h.example:65536/hooks", port },
  }
  for _, c in ipairs(cases) do
    local section, name, value, want = c[1], c[2], c[3], c[4]
    local t = { openai = { apiKey = "sk-test-key" }, notify = { hooksToken = "hooks-token" } }
    t[section] = t[section] or {}
    t[section][name] = value
    local cfg, err = config.normalize(t, { quiet = true })
    T.eq(cfg, nil, value)
    T.match(err, "^" .. section .. "%." .. name .. ": " .. want .. ", got ", value)
  end
  local fine = {
    { "server", "publicBaseUrl", "https://example.ngrok.app/base/" },
    { "server", "publicBaseUrl", "http://[::1]:8080" },
    { "server", "publicBaseUrl", "http://[fe80::1%25eth0]:8080" },
    { "server", "publicBaseUrl", "http://[::ffff:127.0.0.1]" },
    { "server", "publicBaseUrl", "http://my_app.internal:65535" },
    { "server", "publicBaseUrl", "https://CALLS.Example.ORG./" },
    { "twilio", "apiBaseUrl", "http://127.0.0.1:19001" },
    -- realtime.lua appends "&model=" after a query (Azure's api-version).
    { "openai", "realtimeUrl", "wss://x.example/openai/realtime?api-version=2025-04-01" },
    -- The receiver's token may be in the query; "/agent" goes before it.
    { "notify", "hooksUrl", "https://h.example/hooks?token=abc" },
  }
  for _, c in ipairs(fine) do
    local t = { openai = { apiKey = "sk-test-key" }, notify = { hooksToken = "hooks-token" } }
    t[c[1]] = t[c[1]] or {}
    t[c[1]][c[2]] = c[3]
    local cfg, err = config.normalize(t, { quiet = true })
    T.ok(cfg, err)
  end
end)

T.test("a string that is not UTF-8 is refused: it would go out in invalid JSON", function()
  local cases = {
    { "notify", "sessionKey", "sess-\xff\xfe", 6 },
    { "openai", "model", "gpt-\xc3", 5 },
    { "openai", "transcriptionModel", "whisper-\xc0\xaf", 9 }, -- over-long "/"
    { "openai", "apiKey", "sk-\xed\xa0\x80-key-1234", 4 }, -- a surrogate
    { "twilio", "authToken", "\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8", 1 },
  }
  for _, c in ipairs(cases) do
    local t = { openai = { apiKey = "sk-test-key" } }
    t[c[1]] = t[c[1]] or {}
    t[c[1]][c[2]] = c[3]
    local cfg, err = config.normalize(t, { quiet = true })
    T.eq(cfg, nil, c[2])
    T.eq(err, string.format("%s.%s: expected UTF-8 text, got a string that is not at byte %d", c[1], c[2], c[4]))
  end
  local cfg, err = config.normalize({ openai = { apiKey = "sk-test-key" }, notify = { sessionKey = "agent:main:café-☎" } }, { quiet = true })
  T.ok(cfg, err)
end)

T.test("an empty store path, model name or session key is refused at start, not failed on later", function()
  local cases = {
    { "store", "path", "", 'store.path: expected a file path, got ""' },
    { "openai", "model", "", 'openai.model: expected a model name, got ""' },
    { "openai", "transcriptionModel", " ", 'openai.transcriptionModel: expected a model name, got " "' },
    { "notify", "sessionKey", "", 'notify.sessionKey: expected a session key (leave the key out for none), got ""' },
  }
  for _, c in ipairs(cases) do
    local t = { openai = { apiKey = "sk-test-key" } }
    t[c[1]] = t[c[1]] or {}
    t[c[1]][c[2]] = c[3]
    local cfg, err = config.normalize(t, { quiet = true })
    T.eq(cfg, nil, c[4])
    T.eq(err, c[4])
  end
end)

T.test("locales are language tags, as the API takes them", function()
  for _, tag in ipairs({ "en", "en-US", "en_US", "es-419", "zh-Hant-TW", "fil-PH" }) do
    local cfg, err = config.normalize({ openai = { apiKey = "sk-test-key" }, defaults = { locale = tag } }, { quiet = true })
    T.ok(cfg, err)
    T.eq(cfg.defaults.locale, tag)
    T.ok(config.is_locale(tag), tag)
  end
  for _, bad in ipairs({ "", "e", "engl", "en--US", "en-", "en-abcdefghi", "en US", "en-US-" .. string.rep("x", 40) }) do
    T.eq(config.is_locale(bad), false, bad)
  end
end)

T.test("null means the default, for a key or a whole section", function()
  local json = require "callagent.json"
  local cfg = assert(config.normalize({ openai = { apiKey = "sk-test-key", voice = json.null }, server = json.null, retry = json.null }, { quiet = true }))
  T.eq(cfg.openai.voice, "alloy")
  T.eq(cfg.server.port, 4545)
  T.eq(cfg.retry.maxAttempts, 3)
end)

T.test("of several problems, the same one is reported every time: sections in their documented order, keys by name", function()
  local bad = {
    store = { retentionDays = 0 },
    call = { wrapUpSec = 0 },
    tunnel = { provider = "x" },
    retry = { maxAttempts = 0 },
    defaults = { locale = "x" },
    notify = { hooksUrl = "x" },
    openai = { voice = "x" },
    twilio = { fromNumber = "x", accountSid = "x" },
    server = { port = "x", host = 1 },
    telephony = { provider = "a b" },
  }
  local sections = { "telephony", "server", "twilio", "openai", "notify", "defaults", "retry", "tunnel", "call", "store" }
  for _, s in ipairs(sections) do
    local _, err = config.normalize(bad, { quiet = true })
    T.match(err, "^" .. s .. "%.", "the first section left with a problem")
    if s == "server" then
      T.match(err, "^server%.host: ", "host before port")
      bad.server.host = nil
      _, err = config.normalize(bad, { quiet = true })
      T.match(err, "^server%.port: ")
    elseif s == "twilio" then
      T.match(err, "^twilio%.accountSid: ", "accountSid before fromNumber")
    end
    bad[s] = nil
  end
  -- And the environment's: the first unset variable in the same order.
  local _, err = config.normalize({
    notify = { hooksToken = "${CALLAGENT_UNSET_A}" },
    openai = { apiKey = "${CALLAGENT_UNSET_B}" },
    server = { publicBaseUrl = "${CALLAGENT_UNSET_C}" },
  }, { quiet = true })
  T.eq(err, "server.publicBaseUrl: environment variable CALLAGENT_UNSET_C is not set")
end)

T.test("twilio.validateSignature false is warned about while twilio is the provider: anyone could forge its webhooks", function()
  local cfg, _, w = config.normalize({ twilio = { validateSignature = false }, openai = { apiKey = "sk-test-key" } },
    { quiet = true })
  T.eq(cfg.twilio.validateSignature, false)
  T.eq(w, { "twilio.validateSignature: false: Twilio's webhooks are not checked, and anyone who reaches the server "
    .. "can forge a call's statuses or have it hung up (for tests on loopback only)" })
  _, _, w = config.normalize({ telephony = { provider = "mock" }, twilio = { validateSignature = false },
    openai = { apiKey = "sk-test-key" } }, { quiet = true })
  T.eq(w, {}, "another provider: the key is not used")
end)

T.test("a non-loopback host is fine with an API token", function()
  local cfg = assert(config.normalize({ server = { host = "0.0.0.0", apiToken = string.rep("t", 32) }, openai = { apiKey = "sk-test-key" } }, { quiet = true }))
  T.eq(cfg.server.host, "0.0.0.0")
end)

T.test("${NAME} is replaced by the environment; a missing variable names the key", function()
  local home = os.getenv("HOME")
  local cfg = assert(config.normalize({ openai = { apiKey = "${PATH}" }, store = { path = "${HOME}/x.db" } }, { quiet = true }))
  T.eq(cfg.openai.apiKey, os.getenv("PATH"))
  T.eq(cfg.store.path, home .. "/x.db")
  local c2, err = config.normalize({ twilio = { authToken = "${CALLAGENT_SURELY_UNSET_VAR}" } }, { quiet = true })
  T.eq(c2, nil)
  T.eq(err, "twilio.authToken: environment variable CALLAGENT_SURELY_UNSET_VAR is not set")
end)

T.test("unknown keys and sections are warned about, not fatal", function()
  local cfg, _, warnings = config.normalize({ server = { prot = 1 }, telefony = {}, openai = { apiKey = "sk-test-key" } }, { quiet = true })
  T.ok(cfg)
  table.sort(warnings)
  T.eq(warnings, { "server.prot: unknown key, ignored", "telefony: unknown section, ignored" })
end)

T.test("an unset variable in an unknown key or section is no error: they are only warned about", function()
  local cfg, err, warnings = config.normalize({
    ["$schema"] = "${CALLAGENT_UNSET_A}",
    extras = { x = "${CALLAGENT_UNSET_B}" },
    server = { bogus = "${CALLAGENT_UNSET_C}" },
    store = { path = "${HOME}/x.db" },
    openai = { apiKey = "sk-test-key" },
  }, { quiet = true })
  T.ok(cfg, err)
  T.eq(cfg.store.path, os.getenv("HOME") .. "/x.db", "a known key is still substituted")
  table.sort(warnings)
  T.eq(warnings, { "extras: unknown section, ignored", "server.bogus: unknown key, ignored" })
  -- An app's own provider's section is read, so substituted.
  local c2, err2 = config.normalize({ telephony = { provider = "acme" }, acme = { key = "${CALLAGENT_UNSET_D}" },
    openai = { apiKey = "sk-test-key" } }, { quiet = true })
  T.eq(c2, nil)
  T.eq(err2, "acme.key: environment variable CALLAGENT_UNSET_D is not set")
  local c3 = assert(config.normalize({ telephony = { provider = "acme" }, acme = { home = "${HOME}", list = { "${HOME}" } },
    openai = { apiKey = "sk-test-key" } }, { quiet = true }))
  T.eq(c3.acme, { home = os.getenv("HOME"), list = { os.getenv("HOME") } })
end)

T.test("openai.caFile must hold PEM certificates OpenSSL can load, not only exist", function()
  local dir = T.tmpdir()
  local ca = require("certs").make(dir).ca
  local function try(path)
    return config.normalize({ openai = { apiKey = "sk-test-key", caFile = path } }, { quiet = true })
  end
  local cfg, err = try(ca)
  T.ok(cfg, err)
  -- A bundle with several, as /etc/ssl/certs/ca-certificates.crt.
  local pem = assert(io.open(ca)):read("a")
  local f = assert(io.open(dir .. "/two.pem", "w"))
  f:write("# a comment\n", pem, "\n", pem)
  f:close()
  cfg, err = try(dir .. "/two.pem")
  T.ok(cfg, err)
  -- Any file passed before; every call then failed "ETLS: cannot load ca_file".
  cfg, err = try("/etc/passwd")
  T.eq(cfg, nil)
  T.eq(err, "openai.caFile: /etc/passwd holds no PEM certificate")
  f = assert(io.open(dir .. "/key.pem", "w"))
  f:write(assert(io.open(dir .. "/ca.key")):read("a"))
  f:close()
  _, err = try(dir .. "/key.pem")
  T.eq(err, "openai.caFile: " .. dir .. "/key.pem holds no PEM certificate")
  -- One broken block and OpenSSL refuses the whole file.
  f = assert(io.open(dir .. "/bad.pem", "w"))
  f:write(pem, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
  f:close()
  _, err = try(dir .. "/bad.pem")
  T.eq(err, "openai.caFile: " .. dir .. "/bad.pem holds a PEM certificate that is not valid (certificate 2 in the file)")
  _, err = try(dir)
  T.match(err, "^openai%.caFile: expected an existing PEM file of CA certificates")
end)

T.test("openai.sessionMaxSec: 3600 by default, 10-86400, and more than the wrap-up", function()
  local cfg = assert(config.normalize({ openai = { apiKey = "sk-test-key" } }, { quiet = true }))
  T.eq(cfg.openai.sessionMaxSec, 3600)
  local _, err = config.normalize({ openai = { apiKey = "sk-test-key", sessionMaxSec = 9 } }, { quiet = true })
  T.eq(err, "openai.sessionMaxSec: expected a number from 10 to 86400, got 9")
  _, err = config.normalize({ openai = { apiKey = "sk-test-key", sessionMaxSec = 86401 } }, { quiet = true })
  T.eq(err, "openai.sessionMaxSec: expected a number from 10 to 86400, got 86401")
  -- wrapUpSec 20 + goodbyeTimeoutSec 8 by default: a session of 28 s leaves
  -- no time to wrap up in.
  _, err = config.normalize({ openai = { apiKey = "sk-test-key", sessionMaxSec = 28 }, call = { maxDurationSec = 1 } },
    { quiet = true })
  T.eq(err, "openai.sessionMaxSec: expected more than call.wrapUpSec + call.goodbyeTimeoutSec (28 s), got 28: "
    .. "a call must be able to wrap up before the model's session ends")
  cfg, err = config.normalize({ openai = { apiKey = "sk-test-key", sessionMaxSec = 29 }, call = { maxDurationSec = 1 } },
    { quiet = true })
  T.ok(cfg, err)
end)

T.test("a call.maxDurationSec longer than the model's session is warned about, not refused", function()
  local function warnings_for(session, max)
    local cfg, err, warnings = config.normalize({ openai = { apiKey = "sk-test-key", sessionMaxSec = session },
      call = { maxDurationSec = max } }, { quiet = true })
    T.ok(cfg, err)
    return warnings
  end
  -- maxDurationSec + wrapUpSec (20) + goodbyeTimeoutSec (8) against the session.
  T.eq(warnings_for(628, 600), {}, "it just fits")
  T.eq(warnings_for(nil, 3572), {}, "it just fits the default hour")
  local expected = { "call.maxDurationSec (600 s) + call.wrapUpSec + call.goodbyeTimeoutSec is more than "
    .. "openai.sessionMaxSec (627 s): calls that long wrap up before the model's session ends instead" }
  T.eq(warnings_for(627, 600), expected)
  T.eq(warnings_for(nil, 4 * 3600)[1]:match("^call%.maxDurationSec %(14400 s%).*openai%.sessionMaxSec %(3600 s%)"),
    "call.maxDurationSec (14400 s) + call.wrapUpSec + call.goodbyeTimeoutSec is more than openai.sessionMaxSec (3600 s)")
  -- The app starts, and says so once in its log.
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local callagent = require "callagent"
local task = require "callagent.task"
local app = assert(callagent.app({ openai = { apiKey = "sk-test-key" }, call = { maxDurationSec = 7200 },
  server = { port = 0 }, tunnel = { provider = "none" }, store = { backend = "memory" },
  twilio = { accountSid = "AC" .. string.rep("a", 32), authToken = "tw-token-for-tests", fromNumber = "+15551234567" } },
  { no_shutdown_hook = true, public_url = function(u) return u end }))
task.spawn(function()
  assert(app:start())
  print("started")
  app:stop()
end)
]],
  })
  T.eq(code, 0, p.errtext())
  T.eq(p.out, { "started" })
  local n = 0
  for line in (p.errtext() .. "\n"):gmatch("([^\n]*)\n") do
    if line:find("WARN config: call.maxDurationSec (7200 s)", 1, true) then
      n = n + 1
      T.match(line, "openai%.sessionMaxSec %(3600 s%)")
    end
  end
  T.eq(n, 1, "one warning: " .. p.errtext())
end)

T.test("load_file reports a missing file, a folder and invalid JSON by path", function()
  local dir = T.tmpdir()
  local cfg, err = config.load_file(dir .. "/none.json")
  T.eq(cfg, nil)
  T.match(err, "cannot read .*none%.json")
  cfg, err = config.load_file(dir)
  T.eq(cfg, nil)
  T.eq(err, "config: cannot read " .. dir .. ": Is a directory")
  local f = assert(io.open(dir .. "/bad.json", "w"))
  f:write("{ not json")
  f:close()
  cfg, err = config.load_file(dir .. "/bad.json")
  T.eq(cfg, nil)
  T.match(err, "bad%.json is not valid JSON")
end)

T.test("secrets in the config never reach the log", function()
  local code, _, p = T.run_app(nil, nil, {
    source = [[
local config = require "callagent.config"
local log = require "callagent.log"
assert(config.normalize({ twilio = { authToken = "tw-secret-token-1234" }, openai = { apiKey = "sk-openai-secret-5678" },
  server = { apiToken = "api-token-abcdefghijklmnop" }, notify = { hooksUrl = "http://h/x", hooksToken = "hook-secret-9999" } }))
log.info("leak attempt tw-secret-token-1234 sk-openai-secret-5678 api-token-abcdefghijklmnop hook-secret-9999")
]],
  })
  T.eq(code, 0)
  local all = p.errtext()
  T.no_match(all, "secret%-token")
  T.no_match(all, "openai%-secret")
  T.no_match(all, "abcdefghijklmnop")
  T.no_match(all, "hook%-secret")
  T.match(all, "leak attempt %[redacted%] %[redacted%] %[redacted%] %[redacted%]")
end)


-- The error config.normalize gives for cfg, as an app prints it
-- (io.stderr:write(err): no log line redacts it), in a process of its own.
local function printed_error(cfg)
  local code, _, p = T.run_app(nil, nil, {
    source = string.format([[
local config = require "callagent.config"
local cfg, err = config.normalize(require("callagent.json").decode(%q), { quiet = true })
io.stderr:write(tostring(err), "\n")
]], require("callagent.json").encode(cfg)),
  })
  T.eq(code, 0, p.errtext())
  return p.err[1]
end

T.test("an error never quotes a secret written at another key too, nor an OpenAI key pasted at any key", function()
  -- As an app prints it: io.stderr:write(err), no log line to redact it.
  local tok = "f3a9c2e1d4b5a6978877665544332211"
  local key = "sk-proj-" .. string.rep("Zy9_", 12)
  local cases = {
    { { twilio = { accountSid = tok, authToken = tok }, openai = { apiKey = "sk-test-key" } },
      'twilio.accountSid: expected AC followed by 32 hex digits, got "[redacted]"' },
    { { openai = { apiKey = "sk-test-key", realtimeUrl = key } },
      'openai.realtimeUrl: expected a URL like wss://host, got "[redacted]"' },
  }
  for _, c in ipairs(cases) do
    local printed = printed_error(c[1])
    T.eq(printed, c[2])
  end
end)

T.test("a URL's credential-named query values become secrets; others, as ?auth_mode=required, do not", function()
  local log = require "callagent.log"
  local cfg = good()
  cfg.openai.realtimeUrl = "wss://proxy.example.test/v1/realtime?auth_mode=required&design=standard1"
    .. "&X-Api-Key=proxy-key-one-1&access_token=proxy-token-2&sig=proxy-sig-33&tokenizer=cl100k_base"
  assert(config.normalize(cfg))
  for _, secret in ipairs({ "proxy-key-one-1", "proxy-token-2", "proxy-sig-33" }) do
    T.eq(log.scrub("got " .. secret), "got [redacted]", secret)
  end
  for _, plain in ipairs({ "required", "standard1", "cl100k_base" }) do
    T.eq(log.scrub("mode " .. plain), "mode " .. plain, plain .. " is no secret")
  end
end)

T.test("an Azure Functions ?code=, a ?passphrase=, a ?jwt= and a ?session= value are secrets; ?zipcode= is not", function()
  local log = require "callagent.log"
  local cfg = good()
  cfg.notify.hooksUrl = "https://fn.example.test/api/hook?code=azure-fn-key-1&passphrase=phrase-two-2"
    .. "&jwt=eyJhbGciOi-jwt-3&session=sess-value-4&zipcode=zip-99999-5"
  cfg.notify.hooksToken = "hooks-token-for-test"
  assert(config.normalize(cfg))
  for _, secret in ipairs({ "azure-fn-key-1", "phrase-two-2", "eyJhbGciOi-jwt-3", "sess-value-4" }) do
    T.eq(log.scrub("got " .. secret), "got [redacted]", secret)
  end
  T.eq(log.scrub("at zip-99999-5"), "at zip-99999-5", "a zip code is no secret")
end)

T.test("a shortened value keeps a [redacted] and a UTF-8 character whole at the cut", function()
  local tok = "f3a9c2e1d4b5a6978877665544332211"
  local pad = string.rep("x", 35)
  local cases = {
    -- "[redacted]" runs from byte 36 to 45, across the cut at 40.
    { pad .. tok .. " and more", pad .. "[redacted]..." },
    { pad .. tok, pad .. "[redacted]" },
    -- "é" is bytes 40 and 41.
    { string.rep("a", 39) .. "\u{e9}bcd", string.rep("a", 39) .. "..." },
    { string.rep("a", 38) .. "\u{e9}bcd", string.rep("a", 38) .. "\u{e9}..." },
  }
  for _, c in ipairs(cases) do
    local printed = printed_error({ twilio = { authToken = tok, fromNumber = c[1] }, openai = { apiKey = "sk-test-key" } })
    T.eq(printed, 'twilio.fromNumber: expected an E.164 number like +15551234567, got "' .. c[2] .. '"')
  end
end)

T.test("a value with a line break is shown on one line: an error is one line of the log", function()
  local cfg, err = config.normalize({ openai = { apiKey = "sk-test-key" }, twilio = { fromNumber = "+15551234567\n" } },
    { quiet = true })
  T.eq(cfg, nil)
  T.eq(err, 'twilio.fromNumber: expected an E.164 number like +15551234567, got "+15551234567\\n"')
end)

T.test("an error that shortens a long value never shows the head of a secret inside it", function()
  -- The value is cut at 40 bytes: a secret that runs past the cut no
  -- longer matches whole, so it is redacted before the cut.
  local tok = "f3a9c2e1d4b5a6978877665544332211"
  local key = "sk-proj-" .. string.rep("Zy9_", 12)
  local cases = {
    { { twilio = { authToken = tok, fromNumber = "the token is " .. tok }, openai = { apiKey = "sk-test-key" } },
      'twilio.fromNumber: expected an E.164 number like +15551234567, got "the token is [redacted]"' },
    { { openai = { apiKey = "sk-test-key", voice = "Bearer " .. key } },
      "^openai%.voice: expected one of .*, got \"Bearer %[redacted%]\"$" },
    { { openai = { apiKey = "sk-test-key" }, retry = { retryStatuses = { "busy", "upstream said the key " .. key } } },
      '^retry%.retryStatuses: .*%["busy","upstream said the key %[redacted%]"%]' },
  }
  for _, c in ipairs(cases) do
    local printed = printed_error(c[1])
    T.no_match(printed, "Zy9_", "no piece of the OpenAI key")
    T.no_match(printed, "f3a9c2", "no piece of the token")
    if c[2]:sub(1, 1) == "^" then
      T.match(printed, c[2])
    else
      T.eq(printed, c[2])
    end
  end
end)

T.test("server.host must be an IP address or localhost: a name or a blank is refused at start, naming the key", function()
  local token = string.rep("t", 32)
  for _, h in ipairs({ "example.com", "", " 127.0.0.1", "[::1]", "127.000.000.001", "127.1", "fe80::1%eth0",
    "127.evil.example" }) do
    local cfg, err = config.normalize({ server = { host = h, apiToken = token }, openai = { apiKey = "sk-test-key" } },
      { quiet = true })
    T.eq(cfg, nil, h)
    T.match(err, "^server%.host: expected an IP address %(IPv4 or IPv6%) or localhost, got ", h)
  end
  for _, h in ipairs({ "127.0.0.1", "localhost", "0.0.0.0", "::", "::1", "192.168.1.10", "fd7a:115c:a1e0::1",
    "::ffff:127.0.0.1" }) do
    local cfg, err = config.normalize({ server = { host = h, apiToken = token }, openai = { apiKey = "sk-test-key" } },
      { quiet = true })
    T.ok(cfg, h .. ": " .. tostring(err))
  end
end)

T.test("notify keys that send nothing are warned about: a token without a URL, a URL already ending in /agent", function()
  local _, _, w = config.normalize({ notify = { hooksToken = "hook-token-123", sessionKey = "s" },
    openai = { apiKey = "sk-test-key" } }, { quiet = true })
  T.eq(w, { "notify.hooksToken: set without notify.hooksUrl: no notifications are sent" })
  local cfg
  cfg, _, w = config.normalize({ notify = { hooksUrl = "http://127.0.0.1:19000/hooks/agent/", hooksToken = "hook-token-123" },
    openai = { apiKey = "sk-test-key" } }, { quiet = true })
  T.eq(cfg.notify.hooksUrl, "http://127.0.0.1:19000/hooks/agent", "kept as given: /agent is appended to it")
  T.eq(w, { "notify.hooksUrl: ends in /agent, and /agent is appended to it: notifications go to "
    .. "http://127.0.0.1:19000/hooks/agent/agent (set it to http://127.0.0.1:19000/hooks)" })
  _, _, w = config.normalize({ notify = { hooksUrl = "https://u:pw@h.example/hooks/agent?token=abc", hooksToken = "hook-token-123" },
    openai = { apiKey = "sk-test-key" } }, { quiet = true })
  T.match(w[1], "^notify%.hooksUrl: ends in /agent")
  T.no_match(w[1], "pw")
  T.no_match(w[1], "abc")
end)

T.test("a section that is no object is refused without showing what it holds: it may be a secret", function()
  local cases = {
    { { server = { apiToken = "secret-token-1234567890", 4545 } }, "server: expected an object, got a table whose keys are not all names" },
    { { openai = { "sk-live-abcdefgh12345678" } }, "openai: expected an object, got a list" },
    { { openai = "sk-live-abcdefgh12345678" }, "openai: expected an object, got a string" },
    { { notify = "http://u:pw@host/hooks?token=abc" }, "notify: expected an object, got a string" },
    { { twilio = 5 }, "twilio: expected an object, got a number" },
    { { tunnel = true }, "tunnel: expected an object, got true or false" },
  }
  for _, c in ipairs(cases) do
    local cfg, err = config.normalize(c[1], { quiet = true })
    T.eq({ cfg, err }, { nil, c[2] })
  end
end)

T.test("a value from the environment that fails its check is not shown: the variable may hold another key's secret", function()
  -- Two variables swapped (accountSid = "${TWILIO_AUTH_TOKEN}") printed the
  -- auth token in the error, before it was registered as a secret.
  local home = os.getenv("HOME")
  local cases = {
    { { twilio = { accountSid = "${HOME}" } }, 'twilio.accountSid: expected AC followed by 32 hex digits, '
      .. 'got "${HOME}" (its value from the environment is not shown)' },
    { { server = { publicBaseUrl = "https://${HOME}" } }, 'server.publicBaseUrl: expected a URL with a valid host '
      .. '(a DNS name, an IPv4 address or an [IPv6] one), got "https://${HOME}" (its value from the environment is not shown)' },
    { { retry = { retryStatuses = { "busy", "${HOME}" } } }, 'retry.retryStatuses: expected a list of "busy", "no_answer", '
      .. '"failed", got ["busy","${HOME}"] (its value from the environment is not shown)' },
  }
  for _, c in ipairs(cases) do
    c[1].openai = { apiKey = "sk-test-key" }
    local cfg, err = config.normalize(c[1], { quiet = true })
    T.eq(cfg, nil)
    T.eq(err, c[2])
    T.ok(not err:find(home, 1, true), "the value is not in the error")
  end
  -- A value written out is still shown.
  local _, err = config.normalize({ twilio = { accountSid = "AC123" }, openai = { apiKey = "sk-test-key" } }, { quiet = true })
  T.eq(err, 'twilio.accountSid: expected AC followed by 32 hex digits, got "AC123"')
end)

T.test("a secret that would go in clear text to another machine is warned about, naming both keys", function()
  local _, _, w = config.normalize({
    notify = { hooksUrl = "http://hooks.example.org/hooks?token=abc", hooksToken = "hook-token-123" },
    openai = { apiKey = "sk-test-key", realtimeUrl = "ws://u:pw@proxy.example.org/v1/realtime" },
    twilio = { authToken = "tw-token-for-tests", apiBaseUrl = "http://10.0.0.5:8080" },
  }, { quiet = true })
  T.eq(w, {
    "twilio.apiBaseUrl: http:// to 10.0.0.5, another machine: twilio.authToken goes over the network unencrypted",
    "openai.realtimeUrl: ws:// to proxy.example.org, another machine: openai.apiKey goes over the network unencrypted",
    "notify.hooksUrl: http:// to hooks.example.org, another machine: notify.hooksToken goes over the network unencrypted",
  })
  -- This machine, TLS, or no secret to send: nothing to say.
  _, _, w = config.normalize({
    notify = { hooksUrl = "http://127.0.0.1:19000/hooks", hooksToken = "hook-token-123" },
    openai = { apiKey = "sk-test-key", realtimeUrl = "ws://localhost:9000/v1/realtime" },
    twilio = { authToken = "tw-token-for-tests", apiBaseUrl = "https://api.twilio.example" },
  }, { quiet = true })
  T.eq(w, {})
  _, _, w = config.normalize({ openai = { realtimeUrl = "ws://10.0.0.5/v1/realtime" } }, { quiet = true })
  T.eq(w, {})
end)

T.run()
