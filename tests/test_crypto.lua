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

T.run()
