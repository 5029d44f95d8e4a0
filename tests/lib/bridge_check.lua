--- bridge_check: is a message the bridge (src/bridge.c) wrote for the other
-- side well-formed? Shared by tests/test_bridge.lua and tests/c/fuzz_bridge.c.
--
--   local check = require("bridge_check")(stream_sid)
--   check("model" | "phone", msg) -> nil, or what is wrong
--
-- To the model: an append with base64 audio. To the phone: media (base64),
-- mark (digits) or clear, for that stream. Exact key sets: a key smuggled in
-- through a field's value shows up as one too many.
local cjson = require "cjson"
local b64decode = require("callagent.crypto").base64_decode

local function keys(t)
  if type(t) ~= "table" then
    return ""
  end
  local k = {}
  for name in pairs(t) do
    k[#k + 1] = tostring(name)
  end
  table.sort(k)
  return table.concat(k, ",")
end

local function b64(s)
  return type(s) == "string" and #s > 0 and b64decode(s) ~= nil
end

return function(sid)
  return function(to, msg)
    if msg:find("[%z\1-\31]") then
      return "a control character"
    end
    local ok, v = pcall(cjson.decode, msg)
    if not ok or type(v) ~= "table" then
      return "not a JSON object"
    end
    local k = keys(v)
    if to == "model" then
      if k ~= "audio,type" or v.type ~= "input_audio_buffer.append" then
        return "not an append"
      end
      return not b64(v.audio) and "append audio not base64" or nil
    end
    if v.streamSid ~= sid then
      return "wrong streamSid"
    end
    if v.event == "media" then
      if k ~= "event,media,streamSid" or keys(v.media) ~= "payload" then
        return "media keys"
      end
      return not b64(v.media.payload) and "media payload not base64" or nil
    elseif v.event == "mark" then
      if k ~= "event,mark,streamSid" or keys(v.mark) ~= "name" then
        return "mark keys"
      end
      return not (type(v.mark.name) == "string" and v.mark.name:match("^%d+$")) and "mark name" or nil
    elseif v.event == "clear" then
      return k ~= "event,streamSid" and "clear keys" or nil
    end
    return "unknown event"
  end
end
