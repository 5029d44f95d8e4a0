-- providers/twilio.lua checks X-Twilio-Signature exactly as Twilio signs
-- (protocols.md section 4 vectors, port variants, bodySHA256).
local T = require "testing"
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

T.run()
