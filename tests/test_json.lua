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

-- Fuzz-style properties: a seeded generator, each case checked against the
-- documented contract or a small reference written here.

local function pick(s)
  local i = math.random(1, #s)
  return s:sub(i, i)
end

local function rand_bytes(n, alphabet)
  local t = {}
  for i = 1, n do
    t[i] = alphabet and pick(alphabet) or string.char(math.random(0, 255))
  end
  return table.concat(t)
end

-- Strings a JSON encoder must escape or may mangle, as valid UTF-8.
local PIECES = { "a", "/", "\\", '"', "\\/", "\0", "\1", "\b", "\t", "\n", "\f", "\r", "\31", "\127", "é", "✓",
  "\u{2028}", "😀", "[]", "{}", "callagent:", "\0callagent:empty-array\0", "\0callagent:esc:", "u0000" }
local function rand_string()
  local t = {}
  for i = 1, math.random(0, 6) do
    t[i] = PIECES[math.random(#PIECES)]
  end
  return table.concat(t)
end

local function rand_number()
  local r = math.random(6)
  if r == 1 then
    return math.random(-1000, 1000)
  elseif r == 2 then
    return math.random(-(2 ^ 53), 2 ^ 53) -- integers a double holds exactly
  elseif r == 3 then
    return math.random() * 10 ^ math.random(-30, 30)
  elseif r == 4 then
    -- Any finite double, from its bits.
    local x
    repeat
      x = string.unpack("<d", string.pack("<i8", math.random(math.mininteger, math.maxinteger)))
    until x == x and x ~= math.huge and x ~= -math.huge
    return x
  elseif r == 5 then
    return ({ 0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 0.1, 1 / 3 })[math.random(7)]
  end
  return math.random(-100, 100) + 0.0
end

-- A random value that JSON can hold, and what decoding its text gives back
-- (numbers come back as floats; an empty marked array as an empty table).
local function rand_value(depth)
  local r = math.random(depth > 4 and 5 or 8)
  if r == 1 then
    return rand_string()
  elseif r == 2 then
    return rand_number()
  elseif r == 3 then
    return math.random(2) == 1
  elseif r == 4 then
    return json.null
  elseif r == 5 then
    return json.array()
  elseif r == 6 then
    local t = {}
    for i = 1, math.random(1, 4) do
      t[i] = rand_value(depth + 1)
    end
    return math.random(2) == 1 and json.array(t) or t
  else
    local t = {}
    for _ = 1, math.random(0, 4) do
      t[rand_string()] = rand_value(depth + 1)
    end
    return t
  end
end

-- Equality where numbers compare as numbers (1 == 1.0) and marked empty
-- arrays, with marks, must stay marked when marks is true.
local function same(a, b, marks)
  if type(a) ~= type(b) then
    return false
  elseif type(a) == "number" then
    return a == b and (a ~= 0 or 1 / a == 1 / b) -- -0.0 stays -0.0
  elseif type(a) ~= "table" then
    return a == b
  end
  if marks and json.is_array(a) and next(a) == nil and not (json.is_array(b) and next(b) == nil) then
    return false
  end
  for k, v in pairs(a) do
    if not same(v, b[k], marks) then
      return false
    end
  end
  for k in pairs(b) do
    if a[k] == nil then
      return false
    end
  end
  return true
end

T.test("fuzz: decode(encode(v)) is v for 3000 random values: strings with escapes, any finite double", function()
  math.randomseed(8259)
  for _ = 1, 3000 do
    local v = rand_value(0)
    local text = json.encode(v)
    T.no_match(text:gsub("\\\\", ""), "\\/", "no escaped slash")
    T.no_match(text, "[%z\1-\31]", "control characters escaped")
    local back = json.decode(text)
    if not same(v, back) then
      T.eq(back, v, text)
    end
    back = json.try_decode(text, true)
    if not same(v, back, true) then
      T.eq(back, v, "try_decode(..., true) " .. text)
    end
    back = json.decode_stored(json.encode_stored(v))
    if not same(v, back, true) then
      T.eq(back, v, "stored " .. text)
    end
  end
end)

T.test("fuzz: every finite double is written so it reads back exactly, in at most 17 digits", function()
  math.randomseed(754)
  for _ = 1, 3000 do
    local x = string.unpack("<d", string.pack("<i8", math.random(math.mininteger, math.maxinteger)))
    if x == x and x ~= math.huge and x ~= -math.huge then
      local text = json.encode(x)
      T.eq(json.decode(text), x, text)
      T.ok(#text:gsub("e.*", ""):gsub("[^%d]", ""):gsub("^0+", "") <= 17, text)
    else
      T.raises(function() json.encode(x) end, "must not be NaN or Inf")
    end
  end
end)

-- Texts near valid JSON: a few characters replaced, inserted or dropped.
local mutate = require("mutate").near('[]{}",:\\/0-1e.E+tfnu \t\n\r\0\xff\xc3ua')

T.test("fuzz: try_decode never raises on 5000 mutated texts, and arrays=true only marks empty arrays", function()
  math.randomseed(7159)
  local decoded = 0
  for _ = 1, 5000 do
    local s = mutate(json.encode(rand_value(0)))
    local ok, v, err = pcall(json.try_decode, s)
    T.ok(ok, s)
    local ok2, v2, err2 = pcall(json.try_decode, s, true)
    T.ok(ok2, s)
    if v == nil then
      T.match(err, "^EJSON: ", s)
      T.eq(v2, nil, s)
      T.match(err2, "^EJSON: ", s)
    else
      decoded = decoded + 1
      T.ok(same(v, v2), s)
      local plain = pcall(json.decode, s)
      T.ok(plain or s:find("\0", 1, true) == nil, "try_decode took what decode refused: " .. s)
    end
  end
  T.diag(decoded .. " of 5000 mutated texts were still JSON")
end)

T.test("deep nesting: try_decode refuses past 1000 levels without raising; encode and check refuse past 100", function()
  for _, n in ipairs({ 999, 1000, 1001, 100000 }) do
    for _, open in ipairs({ "[", '{"a":' }) do
      local s = open:rep(n) .. "1" .. (open == "[" and "]" or "}"):rep(n)
      local ok, v, err = pcall(json.try_decode, s, true)
      T.ok(ok, "no raise at " .. n)
      T.eq(v ~= nil, n <= 1000, open .. " x " .. n)
      if n > 1000 then
        T.match(err, "^EJSON: Found too many nested data structures")
      end
    end
  end
  local v = 1
  for _ = 1, 101 do
    v = { v }
  end
  T.raises(function() json.encode(v) end, "nesting too deep")
  T.eq({ json.check(v, 200) }, { false, "is nested deeper than 100 levels" })
  T.eq(json.check(v[1], 200), true, "100 levels")
  T.eq(json.decode(json.encode(v[1])), v[1])
  local loop = {}
  loop.self = loop
  T.raises(function() json.encode(loop) end, "nesting too deep")
end)

T.test("json.check says what is wrong: a sparse array, a function or a boolean key is not a number", function()
  T.eq({ json.check({ [1000] = 1 }, 10) }, { false, "holds a sparse array JSON cannot hold" })
  T.eq({ json.check({ f = print }, 10) }, { false, "holds a function JSON cannot hold" })
  T.eq({ json.check({ [true] = 1 }, 10) }, { false, "holds a key JSON cannot hold (not a string or number)" })
  T.eq({ json.check({ 1e400 }, 10) }, { false, "holds a number JSON cannot hold" })
end)

-- Strict UTF-8 (RFC 3629), one sequence at a time.
local function ref_utf8(s)
  local i = 1
  while i <= #s do
    local c = s:byte(i)
    local n, min
    if c < 0x80 then
      n, min = 0, 0
    elseif c >= 0xC2 and c <= 0xDF then
      n, min = 1, 0x80
    elseif c >= 0xE0 and c <= 0xEF then
      n, min = 2, 0x800
    elseif c >= 0xF0 and c <= 0xF4 then
      n, min = 3, 0x10000
    else
      return false
    end
    local cp = n == 0 and c or c & (0x3F >> n)
    for k = 1, n do
      local b = s:byte(i + k)
      if not b or b & 0xC0 ~= 0x80 then
        return false
      end
      cp = cp << 6 | (b & 0x3F)
    end
    if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then
      return false
    end
    i = i + n + 1
  end
  return true
end

T.test("fuzz: is_utf8 agrees with a strict RFC 3629 reference and utf8() always makes UTF-8, 5000 strings", function()
  math.randomseed(3629)
  local BYTES = "a\x7f\x80\xbf\xc0\xc1\xc2\xdf\xe0\xed\xef\xf0\xf4\xf5\xff\xa0\x9f\x8f\x90"
  for _ = 1, 5000 do
    local s = rand_bytes(math.random(0, 6), BYTES)
    T.eq(json.is_utf8(s), ref_utf8(s), string.format("%q", s))
    local fixed = json.utf8(s)
    T.ok(ref_utf8(fixed), string.format("%q -> %q", s, fixed))
    if ref_utf8(s) then
      T.eq(fixed, s)
    end
    local t = json.utf8({ [s] = { s } })
    T.ok(json.is_utf8(t), string.format("%q in a table", s))
  end
end)

T.run()
