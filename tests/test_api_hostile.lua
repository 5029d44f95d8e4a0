-- The REST API and the config as a demanding new user meets them, going by
-- README.md alone: what the first passes let through.
local T = require "testing"
local config = require "callagent.config"
local kit = require "callkit"

T.test("a JSON config saved with a UTF-8 byte order mark (Notepad) is read, as the API reads such a body", function()
  -- It was "config: ... is not valid JSON: Expected value but found invalid
  -- token at character 1", naming nothing a user could see in the file.
  local dir = T.tmpdir()
  local path = dir .. "/callagent.json"
  local f = assert(io.open(path, "wb"))
  f:write("\239\187\191", '{"telephony": {"provider": "mock"}, "server": {"port": 4999},'
    .. ' "openai": {"realtimeUrl": "ws://127.0.0.1:9/v1/realtime"}, "store": {"backend": "memory"}}')
  f:close()
  local cfg, err = config.load_file(path)
  T.eq(err, nil)
  T.eq({ cfg.telephony.provider, cfg.server.port }, { "mock", 4999 })
  -- Only at the very start: one anywhere else is no JSON.
  f = assert(io.open(path, "wb"))
  f:write(' \239\187\191{"telephony": {"provider": "mock"}}')
  f:close()
  cfg, err = config.load_file(path)
  T.eq(cfg, nil)
  T.match(err, "^config: .*callagent%.json is not valid JSON: ")
end)

T.test("a config file that is not there is named once in the error, not twice", function()
  -- io.open's message starts with the path: "cannot read x.json: x.json: No such file or directory".
  local path = T.tmpdir() .. "/none.json"
  local cfg, err = config.load_file(path)
  T.eq(cfg, nil)
  T.eq(err, "config: cannot read " .. path .. ": No such file or directory")
end)

T.test("a compressed body (Content-Encoding: gzip) is 415 naming Content-Encoding, not read as it came", function()
  -- It was read as plain JSON: gzip's bytes were "invalid_json: a NUL byte",
  -- and a JSON body labeled gzip by mistake placed a call.
  local env = kit.start({ twilio = { behaviour = { ring_ms = 10000 } } })
  local log_lines = T.log_lines("warn")
  local json_body = '{"to":"+14155550180","prompt":"Ask for the hours."}'
  for _, case in ipairs({
    { "gzip", "\31\139\8\0\0\0\0\0\0\3\171\174\5\0\67\191\166\163\2\0\0\0" },
    { "gzip", json_body },
    { "br", json_body },
    { "gzip, identity", json_body },
  }) do
    local status, body, res = env:api("POST", "/v1/calls", case[2], { ["Content-Encoding"] = case[1] })
    T.eq({ status, body.error and body.error.code, body.error and body.error.field },
      { 415, "unsupported_media_type", "Content-Encoding" }, case[1])
    T.eq(res.headers["accept-encoding"], "identity", "the one coding taken (RFC 7694)")
  end
  T.eq(#env.tw.calls, 0, "nothing dialed")
  local logged = 0
  for _, l in ipairs(log_lines) do
    if l.msg == "api: bad request" and l.fields.code == "unsupported_media_type" and l.fields.field == "Content-Encoding" then
      logged = logged + 1
    end
  end
  T.eq(logged, 4, "each logged once, naming the header")
  -- identity is no coding, in any case.
  T.eq((env:api("POST", "/v1/calls", json_body, { ["Content-Encoding"] = "Identity" })), 201)
end)

T.run()
