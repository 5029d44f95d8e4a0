-- callagent.json is Debian's lua-cjson plus empty arrays and safe decoding.
local T = require "testing"
local json = require "callagent.json"

T.test("callagent.json and cjson are the same encoder and decoder", function()
  local cjson = require "cjson"
  T.eq(json.decode('{"a":[1,2,{"b":null}]}').a[3].b, cjson.null)
  T.eq(cjson.encode({ x = 1 }), '{"x":1}')
  T.eq(json.null, cjson.null)
end)

T.test("arrays marked with json.array encode as [] when empty, at any depth", function()
  T.eq(json.encode({ steps = json.array() }), '{"steps":[]}')
  T.eq(json.encode(json.array()), "[]")
  local s = json.encode({ a = { b = json.array({}) }, c = json.array({ 1, 2 }) })
  T.match(s, '"b":%[%]')
  T.match(s, '"c":%[1,2%]')
  T.eq(json.encode({}), "{}", "unmarked empty tables stay objects")
  T.eq(json.is_array(json.array()), true)
end)

T.test("slashes are written plainly and strings with the sentinel text are untouched", function()
  T.eq(json.encode({ url = "https://a/b" }), '{"url":"https://a/b"}')
  T.eq(json.decode(json.encode({ s = "a\\/b" })).s, "a\\/b")
  T.eq(json.encode({ s = "callagent:empty-array" }), '{"s":"callagent:empty-array"}')
end)

T.test("try_decode returns nil and EJSON instead of raising", function()
  local v, err = json.try_decode("{bad")
  T.eq(v, nil)
  T.match(err, "^EJSON: ")
  v, err = json.try_decode(nil)
  T.eq(v, nil)
  T.match(err, "^EJSON: ")
  T.eq(json.try_decode("[1]"), { 1 })
end)

T.run()
