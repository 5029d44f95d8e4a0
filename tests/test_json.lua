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
  v, err = json.try_decode('{"a":1}\0{{{')
  T.eq(v, nil, "what follows a NUL is not skipped")
  T.match(err, "^EJSON: a NUL byte")
  T.eq(json.try_decode('{"a":"\\u0000"}'), { a = "\0" }, "an escaped NUL is fine")
end)

T.test("every number is written exactly: cjson's 14 digits are not enough for all", function()
  for _, x in ipairs({ 0.1, 1 / 3, 123456789012345, 0.1234567890123456, 2 ^ 53, 5e-324, -1.7976931348623157e308,
    12345678901234567 }) do
    local text = json.encode({ x })
    T.eq(json.decode(text)[1], x + 0.0, text)
  end
  T.eq(json.encode({ n = 123456789012345 }), '{"n":123456789012345}')
  T.eq(json.encode(5), "5")
  -- A client's string that looks like the markers stays a string, also
  -- when the value next to it makes the encoder put its markers right.
  local forged = { s = "\0callagent:number:0x10\0", e = "\0callagent:empty-array\0", n = 0.1234567890123456,
    a = json.array({}) }
  T.eq(json.decode(json.encode(forged)), { s = forged.s, e = forged.e, n = forged.n, a = {} })
  T.eq(json.decode_stored(json.encode_stored(forged)).s, forged.s)
end)

T.test("try_decode(s, true) keeps empty arrays at any depth; only JSON's whitespace counts", function()
  local v = json.try_decode('{"a":[],"b":[[ ],{"c":[\n]}],"s":"[]","q":"\\"[]"}', true)
  T.eq(json.encode(v.a), "[]")
  T.eq(json.encode(v.b), '[[],{"c":[]}]')
  T.eq({ v.s, v.q }, { "[]", '"[]' })
  T.ok(json.is_array(json.try_decode("[]", true)))
  T.eq(json.try_decode('{"a":[\f]}', true), nil, "not JSON")
  local _, err = json.try_decode('{"a":[], "b": tru}', true)
  T.match(err, "at character 15$", "the error's place in the text as sent")
  local back = json.decode_stored(json.encode_stored({ l = json.array({}), m = { json.array({}) } }))
  T.eq({ json.encode(back.l), json.encode(back.m) }, { "[]", "[[]]" })
end)

T.test("a client's strings that look like the markers come back as sent, from the API and from the store", function()
  local EMPTY = "\0callagent:empty-array\0"
  local sent = '{"m":["\\u0000callagent:empty-array\\u0000"],"e":"\\u0000callagent:esc:x","l":[]}'
  local v = json.try_decode(sent, true)
  T.eq(v.m, { EMPTY }, "a one-element array, not []")
  T.eq(v.e, "\0callagent:esc:x")
  T.ok(json.is_array(v.l))
  local back = json.decode_stored(json.encode_stored(v))
  T.eq(back.m, { EMPTY }, "stored and read back: still the string")
  T.eq(back.e, "\0callagent:esc:x", "a string that starts like the escape keeps it")
  T.ok(json.is_array(back.l) and next(back.l) == nil, "a real empty array stays one")
  T.eq(json.decode_stored(json.encode_stored(EMPTY)), EMPTY, "at the top level too")
  -- Text stored before: a plain [EMPTY] is an empty array, other strings as they are.
  T.ok(json.is_array(json.decode_stored('{"a":["\\u0000callagent:empty-array\\u0000"]}').a))
end)

T.run()
