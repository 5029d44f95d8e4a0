-- providers/twilio.lua checks X-Twilio-Signature exactly as Twilio signs
-- (protocols.md section 4 vectors, port variants, bodySHA256).
local T = require "testing"
local kit = require "callkit"
local fetch = require "callagent.fetch"
local fake_twilio = require "fakes.twilio"
local twilio = dofile(require("callagent.core").root .. "/providers/twilio.lua")

local TOKEN = "12345"
local DEFAULT = {
  CallSid = "CA1234567890ABCDE",
  Caller = "+14158675309",
  Digits = "1234",
  From = "+14158675309",
  To = "+18005551212",
}

T.test("the signature of the reference request matches", function()
  local url = "https://mycompany.com/myapp.php?foo=1&bar=2"
  T.eq(twilio.signature(TOKEN, url, DEFAULT), "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
  T.eq(twilio.check_signature(TOKEN, url, DEFAULT, "RSOYDt4T1cUTdK1PDd93/VVr8B8="), true)
end)

T.test("a URL without its port validates a signature made with :443, and one with its port", function()
  T.eq(twilio.check_signature(TOKEN, "https://mycompany.com/myapp.php?foo=1&bar=2", DEFAULT, "kvajT1Ptam85bY51eRf/AJRuM3w="), true)
  T.eq(twilio.check_signature(TOKEN, "http://mycompany.com:1234/myapp.php?foo=1&bar=2", DEFAULT, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="), true)
end)

T.test("repeated parameters are sorted and their duplicates dropped", function()
  local params = { Sid = "CA123", SidAccount = "AC123", Digits = { "5678", "1234", "1234" } }
  T.eq(twilio.check_signature(TOKEN, "https://mycompany.com/myapp.php?foo=1&bar=2", params, "IK+Dwps556ElfBT0I3Rgjkr1wJU="), true)
end)

T.test("a JSON body is checked through bodySHA256", function()
  local url = "https://mycompany.com/myapp.php?foo=1&bar=2&bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
  local body = '{"property": "value", "boolean": true}'
  T.eq(twilio.check_signature(TOKEN, url, {}, "a9nBmqA0ju/hNViExpshrM61xv4=", body), true)
  T.eq(twilio.check_signature(TOKEN, url, {}, "a9nBmqA0ju/hNViExpshrM61xv4=", body .. " "), false, "tampered body")
end)

T.test("any change to token, URL, parameters or signature fails", function()
  local url = "https://mycompany.com/myapp.php?foo=1&bar=2"
  local sig = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
  T.eq(twilio.check_signature("54321", url, DEFAULT, sig), false)
  T.eq(twilio.check_signature(TOKEN, url .. "&x=1", DEFAULT, sig), false)
  local p = {}
  for k, v in pairs(DEFAULT) do
    p[k] = v
  end
  p.To = "+18005551213"
  T.eq(twilio.check_signature(TOKEN, url, p, sig), false)
  T.eq(twilio.check_signature(TOKEN, url, DEFAULT, nil), false)
  T.eq(twilio.check_signature(TOKEN, url, DEFAULT, ""), false)
end)

T.test("a real process: a signature that is no HMAC-SHA1, or a form of more parameters than Twilio sends, is refused unread", function()
  local tw, rt = kit.fakes()
  local p, api = kit.app_process(tw, rt)
  local u = api.base .. "/voice?callId=c_none&attempt=1"
  local function post(sig, params)
    local form = {}
    for k, v in pairs(params) do
      form[#form + 1] = k .. "=" .. v
    end
    return assert(fetch(u, { method = "POST", body = table.concat(form, "&"),
      headers = { ["Content-Type"] = "application/x-www-form-urlencoded", ["X-Twilio-Signature"] = sig } })).status
  end
  -- 26,000 parameters (256 KiB) took 100 ms of the event loop to refuse.
  local many, some = {}, { CallSid = "CA" .. string.rep("0", 32) }
  for i = 1, 26000 do
    many[string.format("k%05d", i)] = "v"
  end
  for i = 1, 198 do
    some[string.format("k%03d", i)] = "v"
  end
  T.eq(post("RSOYDt4T1cUTdK1PDd93/VVr8B8=", many), 403)
  T.eq(post("not-a-signature", some), 403)
  -- Twilio's signature of 199 parameters still counts: the voice webhook
  -- of a call that is not dialing is answered with <Hangup/>.
  T.eq(post(fake_twilio.sign(kit.TOKEN, u, some), some), 200)
  local reasons = { "a form of more than 200 parameters (no Twilio webhook has as many)",
    "X-Twilio-Signature is not an HMAC-SHA1 in base64" }
  T.wait_for(function()
    return p.errtext():find("voice webhook for a call that is not dialing", 1, true) ~= nil
  end, 5000, "the log lines: " .. p.errtext())
  for _, why in ipairs(reasons) do
    T.ok(p.errtext():find('voice webhook refused reason="' .. why .. '"', 1, true), why .. ": " .. p.errtext())
  end
end)

T.run()
