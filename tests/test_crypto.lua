local T = require "testing"
local crypto = require "callagent.crypto"
local timer = require "callagent.timer"

local hex, unhex = crypto.to_hex, crypto.from_hex

T.test("sha1 and sha256 return raw digests of known inputs", function()
  T.eq(#crypto.sha1("abc"), 20)
  T.eq(hex(crypto.sha1("abc")), "a9993e364706816aba3e25717850c26c9cd0d89d")
  T.eq(hex(crypto.sha1("")), "da39a3ee5e6b4b0d3255bfef95601890afd80709")
  T.eq(#crypto.sha256("abc"), 32)
  T.eq(hex(crypto.sha256("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
  T.eq(hex(crypto.sha256("a\0b")), "59b271ae1bbcb1d31d41929817f4b16fb439eb4f31520b5ad1d5ce98920a7138",
    "binary input is hashed whole")
  T.ne(crypto.sha256("a\0b"), crypto.sha256("a"), "bytes after a NUL count")
end)

T.test("hmac_sha1 and hmac_sha256 match RFC vectors and the empty key", function()
  T.eq(hex(crypto.hmac_sha1("Jefe", "what do ya want for nothing?")),
    "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")
  T.eq(hex(crypto.hmac_sha256("Jefe", "what do ya want for nothing?")),
    "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
  T.eq(hex(crypto.hmac_sha1(string.rep("\x0b", 20), "Hi There")),
    "b617318655057264e28bc0b6fb378c8ef146be00")
  T.eq(hex(crypto.hmac_sha256("", "")), "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad")
  T.eq(hex(crypto.hmac_sha1("", "")), "fbdb1d1b18aa6c08324b7d64b71fb76370690e1d")
end)

T.test("misuse of the hash functions raises argument errors", function()
  T.raises(function() crypto.sha256() end, "bad argument #1")
  T.raises(function() crypto.hmac_sha1("key") end, "bad argument #2")
  T.raises(function() crypto.hmac_sha256({}, "x") end, "bad argument #1")
  T.raises(function() crypto.to_hex(nil) end, "bad argument #1")
  T.raises(function() crypto.base64_encode({}) end, "bad argument #1")
  T.raises(function() crypto.base64_decode(nil) end, "bad argument #1")
end)

T.test("to_hex writes lowercase and from_hex reads both cases", function()
  T.eq(hex("\0\1\xab\xff"), "0001abff")
  T.eq(hex(""), "")
  T.eq(unhex("0001ABff"), "\0\1\xab\xff")
  T.eq(unhex(""), "")
  local all = {}
  for i = 0, 255 do
    all[#all + 1] = string.char(i)
  end
  all = table.concat(all)
  T.eq(#hex(all), 512)
  T.no_match(hex(all), "[^0-9a-f]", "only lowercase hex digits")
  T.eq(unhex(hex(all)), all)
  T.eq(unhex(hex(all):upper()), all)
  local big = crypto.random_bytes(5000)
  T.eq(unhex(hex(big)), big, "round trip beyond the small-result buffer")
end)

T.test("from_hex returns EINVAL for an odd length or a non-hex character", function()
  for _, bad in ipairs({ "abc", "0", "zz", "0g", "g0", "  ", "0x12", "12 34", "ab\0c" }) do
    local v, err = unhex(bad)
    T.eq(v, nil, string.format("%q", bad))
    T.match(err, "^EINVAL: ", string.format("%q", bad))
  end
  local _, err = unhex("abc")
  T.match(err, "odd length")
  _, err = unhex("00zz")
  T.match(err, "offset 2")
  _, err = unhex(string.rep("00", 3000) .. "0q")
  T.match(err, "offset 6001", "error in a large input")
end)

local rfc4648 = {
  { "", "", "" },
  { "f", "Zg==", "Zg" },
  { "fo", "Zm8=", "Zm8" },
  { "foo", "Zm9v", "Zm9v" },
  { "foob", "Zm9vYg==", "Zm9vYg" },
  { "fooba", "Zm9vYmE=", "Zm9vYmE" },
  { "foobar", "Zm9vYmFy", "Zm9vYmFy" },
}

T.test("base64 and base64url encode and decode the RFC 4648 vectors", function()
  for _, v in ipairs(rfc4648) do
    T.eq(crypto.base64_encode(v[1]), v[2])
    T.eq(crypto.base64_decode(v[2]), v[1])
    T.eq(crypto.base64url_encode(v[1]), v[3])
    T.eq(crypto.base64url_decode(v[3]), v[1])
  end
  T.eq(crypto.base64_encode("\xfb\xff\xbf"), "+/+/")
  T.eq(crypto.base64url_encode("\xfb\xff\xbf"), "-_-_")
end)

T.test("base64_decode returns EINVAL for anything but canonical base64", function()
  local cases = {
    { "Zm9v!mFy", "invalid base64 character 0x21 at offset 4" },
    { "Zm9-", "invalid base64 character 0x2d at offset 3" },
    { "Zm9_", "invalid" },
    { "Zm9vYg", "not a multiple of 4" },
    { "Zm9vYg=", "not a multiple of 4" },
    { "Zm9vYg===", "not a multiple of 4" },
    { "Zm9vY===", "misplaced '='" },
    { "====", "misplaced '='" },
    { "Zm=vYmFy", "misplaced '=' at offset 2" },
    { "Zg==Zm9v", "misplaced '=' at offset 2" },
    { "Zm9v YmFy", "not a multiple of 4" },
    { "Zm9v\nYmF", "invalid base64 character 0x0a at offset 4" },
    { " Zm9", "invalid base64 character 0x20 at offset 0" },
    { "Zm9vYmFy\r\n", "not a multiple of 4" },
    { "Z", "not a multiple of 4" },
    { "Zh==", "non%-zero padding bits" },
    { "Zm9=", "non%-zero padding bits" },
  }
  for _, c in ipairs(cases) do
    local v, err = crypto.base64_decode(c[1])
    T.eq(v, nil, string.format("%q", c[1]))
    T.match(err, "^EINVAL: ", string.format("%q", c[1]))
    T.match(err, c[2], string.format("%q", c[1]))
  end
  local long = crypto.base64_encode(crypto.random_bytes(3000))
  local v, err = crypto.base64_decode(long:sub(1, 100) .. "*" .. long:sub(102))
  T.eq(v, nil)
  T.match(err, "offset 100", "error in a large input")
end)

T.test("base64url_decode rejects padding, the standard alphabet and 1 mod 4 lengths", function()
  local cases = {
    { "Zm9vYg==", "misplaced '=' at offset 6 %(base64url is unpadded%)" },
    { "Zm9+", "invalid base64url character 0x2b" },
    { "Zm9/", "invalid base64url character 0x2f" },
    { "Zm9vY", "1 mod 4" },
    { "Zh", "non%-zero padding bits" },
    { "Zm9", "non%-zero padding bits" },
    { "Zm9v Ym", "invalid base64url character 0x20 at offset 4" },
  }
  for _, c in ipairs(cases) do
    local v, err = crypto.base64url_decode(c[1])
    T.eq(v, nil, string.format("%q", c[1]))
    T.match(err, "^EINVAL: ", string.format("%q", c[1]))
    T.match(err, c[2], string.format("%q", c[1]))
  end
end)

T.test("base64 and base64url round-trip random bytes of every length 0..1500", function()
  for n = 0, 1500 do
    local raw = crypto.random_bytes(n)
    local s = crypto.base64_encode(raw)
    T.eq(#s, (n + 2) // 3 * 4)
    T.eq(crypto.base64_decode(s), raw, "base64 length " .. n)
    local u = crypto.base64url_encode(raw)
    T.no_match(u, "[=+/]", "base64url has no padding and no + or /")
    T.eq(u, (s:gsub("=", ""):gsub("%+", "-"):gsub("/", "_")))
    T.eq(crypto.base64url_decode(u), raw, "base64url length " .. n)
  end
end)

T.test("base64 through Lua: time per 160- and 960-byte frame", function()
  for _, n in ipairs({ 160, 960 }) do
    local raw = crypto.random_bytes(n)
    local s = crypto.base64_encode(raw)
    local enc, dec = crypto.base64_encode, crypto.base64_decode
    local iters = 20000
    local t0 = timer.now()
    for _ = 1, iters do
      enc(raw)
    end
    local t1 = timer.now()
    local out
    for _ = 1, iters do
      out = dec(s)
    end
    local t2 = timer.now()
    T.eq(out, raw)
    T.diag(string.format("base64 via Lua, %d-byte frame: encode %.0f ns, decode %.0f ns (call included)",
      n, (t1 - t0) * 1e6 / iters, (t2 - t1) * 1e6 / iters))
  end
end)

T.test("random_bytes returns the requested lengths and bounds n", function()
  for _, n in ipairs({ 0, 1, 16, 1000, 4097, 1024 * 1024 }) do
    T.eq(#crypto.random_bytes(n), n)
  end
  T.raises(function() crypto.random_bytes(-1) end, "bad argument #1")
  T.raises(function() crypto.random_bytes(1024 * 1024 + 1) end, "bad argument #1")
  T.raises(function() crypto.random_bytes("many") end, "bad argument #1")
  T.raises(function() crypto.random_bytes(1.5) end, "bad argument #1")
end)

T.test("random_bytes values are distinct and look random", function()
  local seen = {}
  for _ = 1, 1000 do
    local r = crypto.random_bytes(16)
    T.eq(seen[r], nil, "repeated 16-byte value")
    seen[r] = true
  end
  -- About half of the bits of 64 KiB are set (mean 262144, sd 362).
  local ones = 0
  local big = crypto.random_bytes(65536)
  for i = 1, #big do
    local b = big:byte(i)
    while b > 0 do
      ones = ones + (b & 1)
      b = b >> 1
    end
  end
  T.near(ones, 262144, 3000, "set bits")
end)

T.test("uuid4 is a lowercase RFC 4122 version 4 UUID and 10000 are unique", function()
  local pattern = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"
  local seen, variants = {}, {}
  for _ = 1, 10000 do
    local u = crypto.uuid4()
    T.eq(#u, 36)
    T.match(u, pattern)
    T.no_match(u, "[A-F]", "lowercase")
    T.eq(seen[u], nil, "duplicate uuid")
    seen[u] = true
    variants[u:sub(20, 20)] = true
  end
  T.eq(variants, { ["8"] = true, ["9"] = true, a = true, b = true }, "all four variant digits occur")
end)

T.test("random_token is unpadded base64url of nbytes random bytes", function()
  local t = crypto.random_token()
  T.eq(#t, 32, "24 bytes by default")
  T.match(t, "^[%w_-]+$")
  T.eq(#crypto.base64url_decode(t), 24)
  T.eq(#crypto.random_token(16), 22)
  T.eq(#crypto.base64url_decode(crypto.random_token(16)), 16)
  T.eq(#crypto.random_token(1), 2)
  T.eq(#crypto.random_token(1024), 1366)
  local seen = {}
  for _ = 1, 1000 do
    local tok = crypto.random_token()
    T.eq(seen[tok], nil, "repeated token")
    seen[tok] = true
  end
  T.raises(function() crypto.random_token(0) end, "bad argument #1")
  T.raises(function() crypto.random_token(1025) end, "bad argument #1")
end)

T.test("constant_time_eq is true only for equal strings", function()
  local a = crypto.random_bytes(64)
  T.eq(crypto.constant_time_eq(a, a), true)
  T.eq(crypto.constant_time_eq(a, a:sub(1)), true, "equal content, different string objects")
  T.eq(crypto.constant_time_eq("", ""), true)
  T.eq(crypto.constant_time_eq("abc", "abd"), false, "last byte differs")
  T.eq(crypto.constant_time_eq("xbc", "abc"), false, "first byte differs")
  T.eq(crypto.constant_time_eq("abc", "abcd"), false, "prefix")
  T.eq(crypto.constant_time_eq("abc", ""), false, "empty")
  T.eq(crypto.constant_time_eq("a\0b", "a\0c"), false, "bytes after a NUL count")
  T.raises(function() crypto.constant_time_eq("a", nil) end, "bad argument #2")
end)

-- RFC 8032 section 7.1, TEST 1 and TEST 2.
local rfc8032 = {
  {
    secret = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
    public = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    message = "",
    signature = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
  },
  {
    secret = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
    public = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
    message = "72",
    signature = "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
  },
}

T.test("ed25519 signs and verifies the RFC 8032 test vectors", function()
  for i, v in ipairs(rfc8032) do
    local sig = crypto.ed25519_sign(unhex(v.secret), unhex(v.message))
    T.eq(hex(sig), v.signature, "signature of test " .. i)
    T.eq(crypto.ed25519_verify(unhex(v.public), unhex(v.message), unhex(v.signature)), true, "test " .. i)
  end
end)

T.test("ed25519_verify accepts a Telnyx-style signature and rejects tampering", function()
  local pub, priv = crypto.ed25519_keypair()
  T.eq(#pub, 32)
  T.eq(#priv, 32)
  local pub2 = crypto.ed25519_keypair()
  T.ne(pub, pub2, "fresh key pairs")
  -- Telnyx signs "timestamp|payload"; headers carry base64.
  local payload = '{"data":{"event_type":"call.initiated","id":"0ccc7b54"}}'
  local signed = "1700000000|" .. payload
  local sig_b64 = crypto.base64_encode(crypto.ed25519_sign(priv, signed))
  local key_b64 = crypto.base64_encode(pub)
  local sig, key = crypto.base64_decode(sig_b64), crypto.base64_decode(key_b64)
  T.eq(#sig, 64)
  T.eq(crypto.ed25519_verify(key, signed, sig), true)

  local flipped = string.char(sig:byte(1) ~ 1) .. sig:sub(2)
  T.eq(crypto.ed25519_verify(key, signed, flipped), false, "changed signature")
  T.eq(crypto.ed25519_verify(key, "1700000001|" .. payload, sig), false, "changed timestamp")
  T.eq(crypto.ed25519_verify(key, signed .. " ", sig), false, "changed payload")
  T.eq(crypto.ed25519_verify(pub2, signed, sig), false, "other key")
  T.eq(crypto.ed25519_verify(key:sub(1, 31), signed, sig), false, "31-byte key")
  T.eq(crypto.ed25519_verify(key .. "\0", signed, sig), false, "33-byte key")
  T.eq(crypto.ed25519_verify(key, signed, sig:sub(1, 63)), false, "63-byte signature")
  T.eq(crypto.ed25519_verify(key, signed, sig .. "\0"), false, "65-byte signature")
  T.eq(crypto.ed25519_verify(key, signed, ""), false, "empty signature")
  T.eq(crypto.ed25519_verify(string.rep("\xff", 32), signed, sig), false, "key that is not a point")
  T.eq(crypto.ed25519_verify(key, signed, string.rep("\xff", 64)), false, "garbage signature")
  -- Failures leave nothing behind: a good verification still works.
  T.eq(crypto.ed25519_verify(key, signed, sig), true)
  T.raises(function() crypto.ed25519_sign(priv:sub(2), "x") end, "bad argument #1")
  T.raises(function() crypto.ed25519_verify(key, nil, sig) end, "bad argument #2")
end)

-- Twilio request signatures (reference/protocols.md section 4), built from the
-- primitives alone, as the Twilio provider will do.
local function twilio_signature(token, url, params)
  local names = {}
  for name in pairs(params) do
    names[#names + 1] = name
  end
  table.sort(names)
  local parts = { url }
  for _, name in ipairs(names) do
    local v = params[name]
    local values, seen = {}, {}
    for _, x in ipairs(type(v) == "table" and v or { v }) do
      if not seen[x] then
        seen[x] = true
        values[#values + 1] = x
      end
    end
    table.sort(values)
    for _, x in ipairs(values) do
      parts[#parts + 1] = name .. x
    end
  end
  return crypto.base64_encode(crypto.hmac_sha1(token, table.concat(parts)))
end

-- The URL with its port removed and with the default port added.
local function port_variants(url)
  local scheme, authority, rest = url:match("^(%a[%w+.-]*)://([^/?#]*)(.*)$")
  local host = authority:gsub(":%d+$", "")
  local with_port = authority:find(":%d+$") and authority
    or host .. ":" .. (scheme == "https" and "443" or "80")
  return scheme .. "://" .. host .. rest, scheme .. "://" .. with_port .. rest
end

local function twilio_valid(token, url, params, signature)
  local without, with = port_variants(url)
  return crypto.constant_time_eq(twilio_signature(token, without, params), signature)
    or crypto.constant_time_eq(twilio_signature(token, with, params), signature)
end

local token = "12345"
local url = "https://mycompany.com/myapp.php?foo=1&bar=2"
local defaults = {
  CallSid = "CA1234567890ABCDE",
  Caller = "+14158675309",
  Digits = "1234",
  From = "+14158675309",
  To = "+18005551212",
}

T.test("Twilio signature vectors: plain URL and repeated parameters", function()
  T.eq(twilio_signature(token, url, defaults), "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
  T.eq(twilio_valid(token, url, defaults, "RSOYDt4T1cUTdK1PDd93/VVr8B8="), true)
  local multi = { Sid = "CA123", SidAccount = "AC123", Digits = { "5678", "1234", "1234" } }
  T.eq(twilio_signature(token, url, multi), "IK+Dwps556ElfBT0I3Rgjkr1wJU=")
  T.eq(twilio_valid(token, url, multi, "IK+Dwps556ElfBT0I3Rgjkr1wJU="), true)
end)

T.test("Twilio signature vectors: default and explicit ports", function()
  local with443 = "https://mycompany.com:443/myapp.php?foo=1&bar=2"
  T.eq(twilio_signature(token, with443, defaults), "kvajT1Ptam85bY51eRf/AJRuM3w=")
  T.eq(twilio_valid(token, url, defaults, "kvajT1Ptam85bY51eRf/AJRuM3w="), true,
    "signed with :443, requested without a port")
  T.eq(twilio_valid(token, with443, defaults, "RSOYDt4T1cUTdK1PDd93/VVr8B8="), true,
    "signed without a port, requested with :443")
  local with1234 = "http://mycompany.com:1234/myapp.php?foo=1&bar=2"
  T.eq(twilio_signature(token, with1234, defaults), "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=")
  T.eq(twilio_valid(token, with1234, defaults, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="), true)
  T.ne(twilio_signature(token, "http://mycompany.com/myapp.php?foo=1&bar=2", defaults),
    "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=", "a non-default port is part of what is signed")
end)

T.test("Twilio signature vectors: JSON body checked through bodySHA256", function()
  local body = '{"property": "value", "boolean": true}'
  local hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
  T.eq(hex(crypto.sha256(body)), hash)
  local signed_url = url .. "&bodySHA256=" .. hash
  T.eq(twilio_signature(token, signed_url, {}), "a9nBmqA0ju/hNViExpshrM61xv4=")
  T.eq(twilio_valid(token, signed_url, {}, "a9nBmqA0ju/hNViExpshrM61xv4="), true)
  T.ne(hex(crypto.sha256(body .. " ")), hash, "a changed body fails the hash check")
end)

T.test("Twilio signatures fail for a changed parameter, URL or token", function()
  local sig = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
  local changed = {}
  for k, v in pairs(defaults) do
    changed[k] = v
  end
  changed.Digits = "1235"
  T.eq(twilio_valid(token, url, changed, sig), false, "changed parameter")
  changed.Digits = "1234"
  changed.Extra = ""
  T.eq(twilio_valid(token, url, changed, sig), false, "an added empty parameter")
  T.eq(twilio_valid(token, url, defaults, sig), true, "the unchanged request")
  T.eq(twilio_valid(token, url .. "&baz=3", defaults, sig), false, "changed URL")
  T.eq(twilio_valid(token, (url:gsub("^https", "http")), defaults, sig), false, "changed scheme")
  T.eq(twilio_valid("12346", url, defaults, sig), false, "other token")
end)

-- Fuzz-style properties: a seeded generator, each case checked against a
-- small reference written here in Lua from the module's documented contract.

local ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

-- RFC 4648 in plain Lua: encode with the alphabet's last two characters x, y
-- (padded when pad), and the strict decoder crypto.c documents.
local function ref_encode(s, x, y, pad)
  local a, out = ALPHA .. x .. y, {}
  for i = 1, #s, 3 do
    local b1, b2, b3 = s:byte(i, i + 2)
    local v = b1 << 16 | (b2 or 0) << 8 | (b3 or 0)
    local n = b3 and 4 or b2 and 3 or 2
    for k = 1, 4 do
      if k <= n then
        local c = v >> (24 - 6 * k) & 63
        out[#out + 1] = a:sub(c + 1, c + 1)
      elseif pad then
        out[#out + 1] = "="
      end
    end
  end
  return table.concat(out)
end

local function ref_decode(s, x, y, padded)
  local val = {}
  for i = 1, 64 do
    val[(ALPHA .. x .. y):byte(i)] = i - 1
  end
  local body = s
  if padded then
    if #s % 4 ~= 0 then
      return nil
    end
    body = s:match("^(.-)=?=?$")
    if #s - #body > 0 and #s % 4 ~= 0 then
      return nil
    end
    if #body % 4 == 1 or (#s - #body == 2 and #body % 4 ~= 2) or (#s - #body == 1 and #body % 4 ~= 3) then
      return nil
    end
  elseif #s % 4 == 1 then
    return nil
  end
  local out, acc, bits = {}, 0, 0
  for i = 1, #body do
    local v = val[body:byte(i)]
    if not v then
      return nil
    end
    acc, bits = (acc << 6 | v) & 0xFFFF, bits + 6
    if bits >= 8 then
      bits = bits - 8
      out[#out + 1] = string.char(acc >> bits & 255)
    end
  end
  if acc & ((1 << bits) - 1) ~= 0 then
    return nil -- non-zero padding bits
  end
  return table.concat(out)
end

local function rand_bytes(n)
  local t = {}
  for i = 1, n do
    t[i] = string.char(math.random(0, 255))
  end
  return table.concat(t)
end

-- s with a few characters replaced, inserted or dropped, drawn mostly from
-- the characters a decoder must look at twice.
local mutate = require("mutate").near("=+/-_ \n\r\tAQgw0z\0\xff.%")

T.test("fuzz: base64 and base64url agree with an RFC 4648 reference on 6000 random and mutated inputs", function()
  math.randomseed(4648)
  local checked, refused = 0, 0
  for _ = 1, 3000 do
    local raw = rand_bytes(math.random(0, 40))
    T.eq(crypto.base64_encode(raw), ref_encode(raw, "+", "/", true))
    T.eq(crypto.base64url_encode(raw), ref_encode(raw, "-", "_", false))
    for _, m in ipairs({ mutate(crypto.base64_encode(raw)), mutate(crypto.base64url_encode(raw)) }) do
      local want = ref_decode(m, "+", "/", true)
      local got, err = crypto.base64_decode(m)
      if got ~= want then
        T.eq(got, want, string.format("base64_decode(%q)", m))
      end
      if not got and not err:find("^EINVAL: ") then
        T.eq(err, "EINVAL: ...", string.format("base64_decode(%q)", m))
      end
      want = ref_decode(m, "-", "_", false)
      got, err = crypto.base64url_decode(m)
      if got ~= want then
        T.eq(got, want, string.format("base64url_decode(%q)", m))
      end
      if not got and not err:find("^EINVAL: ") then
        T.eq(err, "EINVAL: ...", string.format("base64url_decode(%q)", m))
      end
      checked, refused = checked + 1, refused + (got and 0 or 1)
    end
  end
  T.diag(string.format("%d mutated inputs, %d refused", checked, refused))
  T.ok(refused > 1000 and refused < checked, "the mutations hit both outcomes")
  -- Past the 4096-byte result kept on the C stack: a luaL_Buffer, also
  -- dropped again when the input is refused.
  for _ = 1, 40 do
    local raw = rand_bytes(math.random(4090, 4200))
    local m = mutate(crypto.base64_encode(raw))
    T.eq(crypto.base64_decode(m), ref_decode(m, "+", "/", true), "large base64")
    m = mutate(crypto.base64url_encode(raw))
    T.eq(crypto.base64url_decode(m), ref_decode(m, "-", "_", false), "large base64url")
  end
end)

T.test("fuzz: from_hex agrees with a reference on random and mutated hex, to_hex round-trips", function()
  math.randomseed(16)
  for _ = 1, 3000 do
    local raw = rand_bytes(math.random(0, 30))
    local h = hex(raw)
    T.eq(unhex(h), raw)
    local m = mutate(math.random(2) == 1 and h or h:upper())
    local want = #m % 2 == 0 and not m:find("[^%x]") and m:gsub("%x%x", function(p)
      return string.char(tonumber(p, 16))
    end) or nil
    local got, err = unhex(m)
    if got ~= want then
      T.eq(got, want, string.format("from_hex(%q)", m))
    end
    T.ok(got or err:find("^EINVAL: "))
  end
end)

-- HMAC (RFC 2104) built here from the hash functions: keys longer than the
-- block are hashed first.
local function ref_hmac(hash, key, data)
  if #key > 64 then
    key = hash(key)
  end
  key = key .. string.rep("\0", 64 - #key)
  local ipad = key:gsub(".", function(c) return string.char(c:byte() ~ 0x36) end)
  local opad = key:gsub(".", function(c) return string.char(c:byte() ~ 0x5c) end)
  return hash(opad .. hash(ipad .. data))
end

T.test("hmac_sha1 and hmac_sha256 match all RFC 2202 and RFC 4231 vectors", function()
  local rep = string.rep
  local long_key = rep("\xaa", 80)
  local sha1_cases = {
    { rep("\x0b", 20), "Hi There", "b617318655057264e28bc0b6fb378c8ef146be00" },
    { "Jefe", "what do ya want for nothing?", "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79" },
    { rep("\xaa", 20), rep("\xdd", 50), "125d7342b9ac11cd91a39af48aa17b4f63f175d3" },
    { unhex("0102030405060708090a0b0c0d0e0f10111213141516171819"), rep("\xcd", 50),
      "4c9007f4026250c6bc8414f9bf50c86c2d7235da" },
    { rep("\x0c", 20), "Test With Truncation", "4c1a03424b55e07fe7f27be1d58bb9324a9a5a04" },
    { long_key, "Test Using Larger Than Block-Size Key - Hash Key First", "aa4ae5e15272d00e95705637ce8a3b55ed402112" },
    { long_key, "Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data",
      "e8e99d0f45237d786d6bbaa7965c7808bbff1a91" },
  }
  for i, c in ipairs(sha1_cases) do
    T.eq(hex(crypto.hmac_sha1(c[1], c[2])), c[3], "RFC 2202 case " .. i)
  end
  local key131 = rep("\xaa", 131)
  local sha256_cases = {
    { rep("\x0b", 20), "Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7" },
    { "Jefe", "what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843" },
    { rep("\xaa", 20), rep("\xdd", 50), "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe" },
    { unhex("0102030405060708090a0b0c0d0e0f10111213141516171819"), rep("\xcd", 50),
      "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b" },
    { rep("\x0c", 20), "Test With Truncation", "a3b6167473100ee06e0c796c2955552b", 16 },
    { key131, "Test Using Larger Than Block-Size Key - Hash Key First",
      "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54" },
    { key131, "This is a test using a larger than block-size key and a larger than block-size data. "
      .. "The key needs to be hashed before being used by the HMAC algorithm.",
      "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2" },
  }
  for i, c in ipairs(sha256_cases) do
    T.eq(hex(crypto.hmac_sha256(c[1], c[2])):sub(1, 2 * (c[4] or 32)), c[3], "RFC 4231 case " .. i)
  end
end)

T.test("fuzz: hmac_sha1 and hmac_sha256 equal RFC 2104 built from the hashes, keys of 0..200 bytes", function()
  math.randomseed(2104)
  for klen = 0, 200 do
    local key, data = rand_bytes(klen), rand_bytes(math.random(0, 150))
    T.eq(crypto.hmac_sha1(key, data), ref_hmac(crypto.sha1, key, data), "key of " .. klen)
    T.eq(crypto.hmac_sha256(key, data), ref_hmac(crypto.sha256, key, data), "key of " .. klen)
  end
end)

T.test("fuzz: constant_time_eq agrees with == on 5000 near-equal pairs", function()
  math.randomseed(5000)
  for _ = 1, 5000 do
    local a = rand_bytes(math.random(0, 8))
    local b = math.random(3) == 1 and a or mutate(a)
    T.ok(crypto.constant_time_eq(a, b) == (a == b), string.format("%q %q", a, b))
  end
end)

T.test("fuzz: random_token(n) decodes to n bytes for every n from 1 to 1024", function()
  for n = 1, 1024 do
    local t = crypto.random_token(n)
    T.no_match(t, "[^%w%-_]")
    T.eq(#crypto.base64url_decode(t), n)
  end
  T.raises(function() crypto.random_token(0) end, "bad argument #1")
  T.raises(function() crypto.random_token(1025) end, "bad argument #1")
end)

T.test("NaN, infinite, fractional and out-of-range byte counts are argument errors", function()
  for _, x in ipairs({ 0 / 0, math.huge, -math.huge, 1.5, 2 ^ 63 }) do
    T.raises(function() crypto.random_bytes(x) end, "number has no integer representation")
    T.raises(function() crypto.random_token(x) end, "number has no integer representation")
  end
  for _, x in ipairs({ math.mininteger, -1, math.maxinteger, 1024 * 1024 + 1 }) do
    T.raises(function() crypto.random_bytes(x) end, "must be 0 .. 1048576")
  end
  for _, x in ipairs({ math.mininteger, 0, 1025, math.maxinteger }) do
    T.raises(function() crypto.random_token(x) end, "must be 1 .. 1024")
  end
  T.raises(function() crypto.random_bytes() end, "number expected")
  T.raises(function() crypto.random_bytes("ten") end, "number expected")
end)

T.run()
