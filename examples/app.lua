-- examples/app.lua: what `make run` starts.
--
--   CALLAGENT_CONFIG=examples/callagent.json ./build/callagent run examples/app.lua
--     uses that JSON config (the seed's shape; "${NAME}" reads the environment).
--   Without CALLAGENT_CONFIG: a local setup - the mock phone in your browser,
--     and OpenAI Realtime when OPENAI_API_KEY is set, else callagent's local
--     stand-in model (offline: it greets, repeats what you say, and reports).
local callagent = require "callagent"
local standin = require "callagent.standin"
local task = require "callagent.task"
local runtime = require "callagent.runtime"

local config = os.getenv("CALLAGENT_CONFIG")
local local_model = false
local port = os.getenv("PORT")
if config == "" then
  -- Set from an unset variable, say (CALLAGENT_CONFIG=$CFG): not the local setup in its place.
  io.stderr:write("callagent: CALLAGENT_CONFIG is empty: set it to a JSON config file, or unset it for the local setup\n")
  runtime.exit(1)
elseif port and not port:find("^%d+$") then -- decimal digits: tonumber took 0x10 as 16, 1e3 as 1000
  io.stderr:write("callagent: PORT must be a port number, got '", port, "'\n")
  runtime.exit(1)
elseif port and config then
  io.stderr:write("callagent: PORT is ignored with CALLAGENT_CONFIG: the port is server.port in ", config, "\n")
end
if not config then
  local key = os.getenv("OPENAI_API_KEY")
  local_model = key == nil or key == ""
  config = {
    telephony = { provider = "mock" },
    server = { port = math.tointeger(tonumber(port or "4545")) },
    openai = { apiKey = local_model and standin.KEY or key, outputFormat = "audio/pcm" },
    call = { ringTimeoutSec = 600 },
    retry = { maxAttempts = 1 },
    store = { backend = "memory" },
  }
end

local app, err = callagent.app(config)
if not app then
  io.stderr:write("callagent: ", err, "\n")
  runtime.exit(1)
end
if local_model then
  app:routes(function(srv)
    standin.mount(srv, "/standin/v1/realtime")
  end)
end

task.spawn(function()
  local ok, serr = app:start()
  if not ok and runtime.shutting_down() then
    return -- stopped by a signal while it started: the stop's exit status stands
  end
  if not ok then
    if type(config) == "table" and serr:find("EADDRINUSE", 1, true) then -- the local setup: PORT picks the port
      serr = serr .. " (another port: PORT=8080 make run)"
    end
    io.stderr:write("callagent: ", serr, "\n")
    runtime.exit(1)
  end
  if local_model then
    app.config.openai.realtimeUrl = app.url:gsub("^http", "ws") .. "/standin/v1/realtime"
  end
  local model = local_model and "LOCAL STAND-IN (no OPENAI_API_KEY set): greets, repeats what you say, reports after 3 turns or the # key"
    or ("OpenAI Realtime, model " .. app.config.openai.model)
  local lines = {
    "",
    "  callagent " .. callagent.version .. " is running on " .. app.url,
    "  telephony: " .. app.provider.name .. "   model: " .. model,
    "",
  }
  if app.provider.name == "mock" then
    lines[#lines + 1] = "  Open " .. app.url .. "/mock/ in your browser and press Call: the call rings there."
    lines[#lines + 1] = "  Or place one with the API; the answer's \"hint\" is the link that answers it:"
  else
    lines[#lines + 1] = "  Place a call with the API:"
  end
  local auth = app.config.server.apiToken and " -H 'Authorization: Bearer <server.apiToken>'" or ""
  lines[#lines + 1] = "    curl -s " .. app.url .. "/v1/calls" .. auth .. " -H 'Content-Type: application/json' \\"
  lines[#lines + 1] = "      -d '{\"to\": \"+15555550100\", \"prompt\": \"Book a dental check-up for next week.\"}'"
  lines[#lines + 1] = "  Ctrl-C stops."
  lines[#lines + 1] = ""
  io.stdout:write(table.concat(lines, "\n"), "\n")
  io.stdout:flush()
end)
