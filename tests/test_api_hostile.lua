-- The REST API and the config as a demanding new user meets them, going by
-- README.md alone: what the first passes let through.
local T = require "testing"
local config = require "callagent.config"

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

T.run()
