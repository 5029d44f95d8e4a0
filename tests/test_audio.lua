-- callagent.audio through the real binary: G.711 on strings, levels, the
-- framer, and the resampler's measured quality (level, SNR, alias and image
-- rejection, delay), its chunking invariance and exact output length.
-- Measured numbers and speeds are printed as "# " diagnostics.
local T = require "testing"
local audio = require "callagent.audio"
local timer = require "callagent.timer"

local PAIRS = {
  { 24000, 8000 }, { 8000, 24000 }, { 16000, 8000 }, { 8000, 16000 }, { 24000, 16000 }, { 16000, 24000 },
}
local ODD_PIECES = { 1, 7, 333, 959, 2, 160, 3, 640, 1001, 5, 4096 }

--- PCM of a sine: amp is a fraction of full scale.
local function tone(hz, rate, seconds, amp)
  local n = math.floor(rate * seconds)
  local t, w, a = {}, 2 * math.pi * hz / rate, amp * 32767
  for i = 0, n - 1 do
    t[#t + 1] = string.pack("<i2", math.floor(a * math.sin(w * i) + 0.5))
  end
  return table.concat(t)
end

--- The samples of a PCM string as an array of integers.
local function samples(pcm)
  local out, pos, n = {}, 1, #pcm // 2
  while #out < n do
    local k = math.min(1000, n - #out)
    local vals = table.pack(string.unpack("<" .. ("i2"):rep(k), pcm, pos))
    for i = 1, k do
      out[#out + 1] = vals[i]
    end
    pos = vals[k + 1]
  end
  return out
end

--- Least-squares fit of a sine at hz to y[first..#y]. Returns its amplitude,
-- its phase (radians, of sin(w*i + phase) at i = 0) and the SNR in dB of the
-- fit against what is left over (everything else, noise included).
local function fit(y, rate, hz, first)
  local w = 2 * math.pi * hz / rate
  local ss, cc, sc, ys, yc = 0, 0, 0, 0, 0
  for i = first, #y do
    local s, c = math.sin(w * (i - 1)), math.cos(w * (i - 1))
    ss, cc, sc = ss + s * s, cc + c * c, sc + s * c
    ys, yc = ys + y[i] * s, yc + y[i] * c
  end
  local det = ss * cc - sc * sc
  local a, b = (ys * cc - yc * sc) / det, (yc * ss - ys * sc) / det
  local sig, res = 0, 0
  for i = first, #y do
    local f = a * math.sin(w * (i - 1)) + b * math.cos(w * (i - 1))
    sig, res = sig + f * f, res + (y[i] - f) ^ 2
  end
  return math.sqrt(a * a + b * b), math.atan(b, a), 10 * math.log(sig / res, 10)
end

local function db(x)
  return 20 * math.log(x, 10)
end

--- Output samples to skip: the filter's warm-up (twice its delay) and a margin.
local function warmup(r)
  return math.ceil(2 * r:delay()) + 16
end

local function run_pieces(r, pcm, pieces)
  local out, i, k = {}, 1, 0
  while i <= #pcm do
    k = k + 1
    local n = pieces[(k - 1) % #pieces + 1]
    out[#out + 1] = r:process(pcm:sub(i, i + n - 1))
    i = i + n
  end
  return table.concat(out)
end

-- G.711 ------------------------------------------------------------------

T.test("mu-law and A-law match the G.711 reference vectors through Lua", function()
  local function u16(...)
    return string.pack("<" .. ("i2"):rep(select("#", ...)), ...)
  end
  T.eq(audio.ulaw_encode(u16(0, 100, 1000, 16384, 32767, -1, -32768)), "\xFF\xF2\xCE\x8F\x80\x7F\x00")
  T.eq(audio.ulaw_decode("\xFF\x7F\x00\x80\x01\xF0\xFE"), u16(0, 0, -32124, 32124, -31100, 120, 8))
  T.eq(audio.alaw_encode(u16(0, -1)), "\xD5\x55", "A-law silence")
  T.eq(audio.alaw_decode("\xD5\x55"), u16(8, -8))
  T.eq(audio.ulaw_encode(""), "")
  T.eq(audio.ulaw_decode(""), "")
end)

T.test("every code survives decode then encode (mu-law 0x7F becomes 0xFF)", function()
  local all = {}
  for c = 0, 255 do
    all[#all + 1] = string.char(c)
  end
  all = table.concat(all)
  local back = audio.ulaw_encode(audio.ulaw_decode(all))
  T.eq(back, all:sub(1, 0x7F) .. "\xFF" .. all:sub(0x81))
  T.eq(audio.alaw_encode(audio.alaw_decode(all)), all)
end)

T.test("transcoders map each code through its linear value", function()
  local all = {}
  for c = 0, 255 do
    all[#all + 1] = string.char(c)
  end
  all = table.concat(all)
  T.eq(audio.ulaw_to_alaw(all), audio.alaw_encode(audio.ulaw_decode(all)))
  T.eq(audio.alaw_to_ulaw(all), audio.ulaw_encode(audio.alaw_decode(all)))
  T.eq(audio.ulaw_to_alaw("\xFF\x7F"), "\xD5\xD5", "silence stays silence")
end)

T.test("encoders and rms_dbfs reject PCM with an odd trailing byte", function()
  T.raises(function()
    audio.ulaw_encode("abc")
  end, "even")
  T.raises(function()
    audio.alaw_encode("\0")
  end, "even")
  T.raises(function()
    audio.rms_dbfs("abc")
  end, "even")
  T.raises(function()
    audio.ulaw_decode({})
  end, "string expected")
end)

T.test("a mu-law round trip keeps a tone's level with the SNR G.711 promises (> 35 dB)", function()
  -- 1013 Hz, so the quantization error does not repeat with the tone's period.
  local pcm = tone(1013, 8000, 1, 0.5)
  local back = samples(audio.ulaw_decode(audio.ulaw_encode(pcm)))
  local amp, _, snr = fit(back, 8000, 1013, 1)
  T.diag(string.format("mu-law round trip of a -6 dBFS 1013 Hz tone: level %+.3f dB, SNR %.1f dB",
    db(amp / (0.5 * 32767)), snr))
  T.near(db(amp / (0.5 * 32767)), 0, 0.1, "level")
  T.ge(snr, 35, "SNR")
end)

-- levels -----------------------------------------------------------------

T.test("resample_linear: a clip to any rate, as the interpolation written out in Lua", function()
  -- The reference: sample i of the output is input position i * from / to,
  -- interpolated between its two neighbours and rounded half up.
  -- In integers, so the reference itself is exact: position j + f / to.
  local function reference(pcm, from, to)
    local n = #pcm // 2
    local out = {}
    for i = 0, (n - 1) * to // from do
      local j, f = i * from // to, i * from % to
      local a = string.unpack("<i2", pcm, 2 * j + 1)
      local b = j + 1 < n and string.unpack("<i2", pcm, 2 * j + 3) or a
      -- a + (b - a) * f / to + 1/2, floored
      out[#out + 1] = string.pack("<i2", (2 * (a * to + (b - a) * f) + to) // (2 * to))
    end
    return table.concat(out)
  end
  local samples = {}
  local seed = 12345
  for i = 1, 4410 do
    seed = (seed * 1103515245 + 12345) % 2147483648
    samples[i] = string.pack("<i2", (seed % 65536) - 32768)
  end
  local noise = table.concat(samples) .. string.pack("<i2<i2", 32767, -32768)
  for _, rates in ipairs({ { 22050, 24000 }, { 24000, 22050 }, { 8000, 24000 }, { 44100, 8000 } }) do
    local got = audio.resample_linear(noise, rates[1], rates[2])
    T.ok(got == reference(noise, rates[1], rates[2]), rates[1] .. " -> " .. rates[2] .. " Hz as the reference")
  end
  T.eq(#audio.resample_linear(noise, 22050, 24000) // 2, math.floor(4411 / (22050 / 24000)) + 1, "length")
  T.eq(audio.resample_linear("", 22050, 24000), "")
  T.eq(audio.resample_linear(string.pack("<i2", -7), 22050, 24000), string.pack("<i2", -7), "one sample")
  T.eq(audio.resample_linear(tone(440, 24000, 0.1, 0.5), 24000, 24000), tone(440, 24000, 0.1, 0.5), "same rate")
  T.raises(function()
    audio.resample_linear("abc", 22050, 24000)
  end, "even")
  T.raises(function()
    audio.resample_linear("ab", 0, 24000)
  end, "1000..192000")
  T.raises(function()
    audio.resample_linear("ab", 22050, 200000)
  end, "1000..192000")
end)

T.test("resample_linear: the last input sample is kept when (n - 1) * to / from is whole", function()
  -- 481 samples at 24 kHz span 480 / 24000 s, which is exactly 441 samples
  -- at 22050 Hz: output 441 lands on input 480. Floating point put that
  -- position a hair short and dropped it.
  for _, c in ipairs({ { 24000, 22050, 481, 442 }, { 24000, 11025, 961, 442 }, { 44100, 16000, 442, 161 },
    { 48000, 44100, 161, 148 } }) do
    local from, to, n, m = c[1], c[2], c[3], c[4]
    local t = {}
    for i = 1, n do
      t[i] = string.pack("<i2", (i * 7919) % 65536 - 32768)
    end
    local pcm = table.concat(t)
    local out = audio.resample_linear(pcm, from, to)
    T.eq(#out // 2, m, from .. " -> " .. to .. " of " .. n .. " samples")
    T.eq(out:sub(-2), pcm:sub(-2), "the last output is the last input")
    T.eq(out:sub(1, 2), pcm:sub(1, 2), "the first output is the first input")
  end
end)

T.test("rms_dbfs: full-scale square 0 dB, full-scale sine -3.01 dB, silence -inf", function()
  T.near(audio.rms_dbfs(string.pack("<i2<i2", 32767, -32768):rep(500)), 0, 0.001, "square")
  T.near(audio.rms_dbfs(tone(1000, 8000, 1, 1)), -3.0103, 0.001, "sine")
  T.near(audio.rms_dbfs(tone(1000, 8000, 1, 0.5)), -9.0309, 0.001, "half-scale sine")
  T.eq(audio.rms_dbfs(("\0"):rep(320)), -math.huge)
  T.eq(audio.rms_dbfs(""), -math.huge)
  T.eq(audio.ulaw_rms_dbfs(("\xFF"):rep(160)), -math.huge, "mu-law silence")
  T.near(audio.ulaw_rms_dbfs(audio.ulaw_encode(tone(1000, 8000, 1, 0.5))), -9.03, 0.05, "mu-law sine")
end)

-- resampler: quality -----------------------------------------------------

T.test("24k->8k keeps a 1 kHz tone within 0.5 dB with SNR >= 60 dB", function()
  local r = audio.resampler(24000, 8000)
  local out = samples(r:process(tone(1000, 24000, 1, 0.5)))
  local amp, _, snr = fit(out, 8000, 1000, warmup(r))
  local level = db(amp / (0.5 * 32767))
  T.diag(string.format("24k->8k 1 kHz at -6 dBFS: level %+.4f dB, SNR %.1f dB", level, snr))
  T.near(level, 0, 0.5, "level")
  T.ge(snr, 60, "SNR")
end)

T.test("24k->8k attenuates a 6 kHz tone by >= 70 dB and keeps the band to 3.4 kHz flat", function()
  local report = {}
  local function gain(hz)
    local r = audio.resampler(24000, 8000)
    local input = tone(hz, 24000, 0.5, 0.9)
    local out = r:process(input)
    local g = audio.rms_dbfs(out:sub(2 * warmup(r) + 1)) - audio.rms_dbfs(input)
    report[#report + 1] = string.format("%d Hz %.2f", hz, g)
    return g
  end
  for _, hz in ipairs({ 300, 1000, 2000, 3000, 3400 }) do
    T.near(gain(hz), 0, 0.5, hz .. " Hz passes")
  end
  T.lt(gain(3700), -3, "3700 Hz is in the transition band")
  for _, hz in ipairs({ 4500, 6000, 8000, 11000 }) do
    T.le(gain(hz), -70, hz .. " Hz is stopped")
  end
  T.diag("24k->8k gain (dB; -inf: the output rounds to silence): " .. table.concat(report, ", "))
end)

T.test("every rate pair keeps a 1 kHz tone within 0.5 dB with SNR >= 60 dB", function()
  local lines = {}
  for _, p in ipairs(PAIRS) do
    local from, to = p[1], p[2]
    local r = audio.resampler(from, to)
    local out = samples(r:process(tone(1000, from, 1, 0.5)))
    local amp, _, snr = fit(out, to, 1000, warmup(r))
    local level = db(amp / (0.5 * 32767))
    lines[#lines + 1] = string.format("%dk->%dk %+.4f dB SNR %.1f", from // 1000, to // 1000, level, snr)
    T.near(level, 0, 0.5, from .. "->" .. to .. " level")
    T.ge(snr, 60, from .. "->" .. to .. " SNR")
  end
  T.diag("1 kHz at -6 dBFS: " .. table.concat(lines, "; "))
end)

T.test("upsampling from 8k attenuates the images above 4 kHz by >= 50 dB", function()
  local lines = {}
  for _, case in ipairs({
    { 24000, 1000, { 7000, 9000, 15000 } },
    { 24000, 3000, { 5000, 11000 } },
    { 16000, 1000, { 7000 } },
    { 16000, 3000, { 5000 } },
  }) do
    local to, hz, images = case[1], case[2], case[3]
    local r = audio.resampler(8000, to)
    local out = samples(r:process(tone(hz, 8000, 1, 0.5)))
    local skip = warmup(r)
    local amp, _, snr = fit(out, to, hz, skip)
    T.ge(snr, 60, string.format("8k->%dk %d Hz: SNR", to // 1000, hz))
    for _, img in ipairs(images) do
      local a = fit(out, to, img, skip)
      local rej = db(amp / math.max(a, 1e-9))
      lines[#lines + 1] = string.format("8k->%dk %d Hz: image %d Hz -%.1f dB", to // 1000, hz, img, rej)
      T.ge(rej, 50, string.format("8k->%dk image of %d Hz at %d Hz", to // 1000, hz, img))
    end
    lines[#lines + 1] = string.format("8k->%dk %d Hz: level %+.4f dB, SNR %.1f dB", to // 1000, hz,
      db(amp / (0.5 * 32767)), snr)
    T.near(db(amp / (0.5 * 32767)), 0, 0.5, "level")
  end
  T.diag(table.concat(lines, "\n"))
end)

T.test("r:delay() is the measured delay of a 100 Hz tone, in output samples", function()
  local lines = {}
  for _, p in ipairs(PAIRS) do
    local from, to = p[1], p[2]
    local r = audio.resampler(from, to)
    local out = samples(r:process(tone(100, from, 1, 0.5)))
    local _, phase = fit(out, to, 100, warmup(r))
    -- The input is sin(w i); the output sin(w (i - delay)), so phase = -w * delay.
    local measured = (-phase / (2 * math.pi * 100 / to)) % (to / 100)
    lines[#lines + 1] = string.format("%dk->%dk %.3f (reported %.3f)", from // 1000, to // 1000, measured, r:delay())
    T.near(measured, r:delay(), 0.05, from .. "->" .. to .. " delay")
  end
  T.eq(audio.resampler(8000, 8000):delay(), 0)
  T.diag("delay in output samples: " .. table.concat(lines, "; "))
end)

-- resampler: streaming contracts ------------------------------------------

T.test("odd-sized pieces give byte-identical output and the same measurements", function()
  for _, p in ipairs(PAIRS) do
    local from, to = p[1], p[2]
    local input = tone(1000, from, 0.5, 0.5)
    local r1, r2 = audio.resampler(from, to), audio.resampler(from, to)
    local whole, pieces = r1:process(input), run_pieces(r2, input, ODD_PIECES)
    T.eq(#pieces, #whole, from .. "->" .. to .. " length")
    T.ok(pieces == whole, from .. "->" .. to .. " output is byte-identical")
  end
  local r = audio.resampler(24000, 8000)
  local out = samples(run_pieces(r, tone(1000, 24000, 1, 0.5), ODD_PIECES))
  local amp, _, snr = fit(out, 8000, 1000, warmup(r))
  T.diag(string.format("24k->8k in odd pieces: level %+.4f dB, SNR %.1f dB", db(amp / (0.5 * 32767)), snr))
  T.ge(snr, 60)
end)

T.test("output length is exact: N samples in give ceil(N * to / from) out", function()
  local pairs_all = { { 8000, 8000 }, { 24000, 24000 } }
  for _, p in ipairs(PAIRS) do
    pairs_all[#pairs_all + 1] = p
  end
  for _, p in ipairs(pairs_all) do
    local from, to = p[1], p[2]
    local r = audio.resampler(from, to)
    local bytes_in, bytes_out, bad = 0, 0, nil
    for k = 1, 200 do
      local n = ODD_PIECES[(k - 1) % #ODD_PIECES + 1]
      bytes_out = bytes_out + #r:process(("\1"):rep(n))
      bytes_in = bytes_in + n
      local want = -((-(bytes_in // 2) * to) // from) -- ceil
      if bytes_out ~= 2 * want and not bad then
        bad = string.format("after %d samples: %d out, want %d", bytes_in // 2, bytes_out // 2, want)
      end
    end
    T.eq(bad, nil, from .. "->" .. to)
  end
end)

T.test("an odd byte is kept and joined with the next chunk", function()
  local copy = audio.resampler(8000, 8000)
  T.eq(copy:process("\x34"), "")
  T.eq(copy:process("\x12\x78"), "\x34\x12")
  T.eq(copy:process("\x56\xBC\x9A"), "\x78\x56\xBC\x9A")
  copy:reset()
  T.eq(copy:process("\x01\x02"), "\x01\x02", "reset drops the odd byte")

  local input = tone(1000, 24000, 0.1, 0.5)
  local a, b = audio.resampler(24000, 8000), audio.resampler(24000, 8000)
  T.eq(b:process(input:sub(1, 961)) .. b:process(input:sub(962)), a:process(input))
end)

T.test("reset forgets the history: output is as from a new resampler", function()
  local x, y = tone(440, 16000, 0.2, 0.7), tone(1000, 16000, 0.2, 0.3)
  local r = audio.resampler(16000, 24000)
  r:process(x .. "\7")
  r:reset()
  T.ok(r:process(y) == audio.resampler(16000, 24000):process(y))
end)

T.test("resampler rejects unsupported rates", function()
  T.raises(function()
    audio.resampler(44100, 8000)
  end, "rate must be")
  T.raises(function()
    audio.resampler(8000, 48000)
  end, "rate must be")
  T.raises(function()
    audio.resampler(8000)
  end)
  T.raises(function()
    audio.resampler(8000, 16000).process(audio.framer(10), "")
  end, "callagent.Resampler expected")
end)

-- framer -----------------------------------------------------------------

T.test("framer splits a stream into fixed frames and keeps the remainder", function()
  local f = audio.framer(4)
  T.eq(f:push("ab"), {})
  T.eq(f:pending(), 2)
  T.eq(f:push("cdefghijk"), { "abcd", "efgh" })
  T.eq(f:pending(), 3)
  T.eq(f:push("l"), { "ijkl" })
  T.eq(f:pending(), 0)
  T.eq(f:push(""), {})
  T.eq(f:push("0123456789AB"), { "0123", "4567", "89AB" })
  -- A long stream in uneven pieces comes out as the same bytes, in order.
  local g, src, got = audio.framer(160), {}, {}
  for i = 1, 5000 do
    src[#src + 1] = string.char(i % 251)
  end
  src = table.concat(src)
  local i, k = 1, 0
  while i <= #src do
    k = k + 1
    local n = ODD_PIECES[(k - 1) % #ODD_PIECES + 1]
    for _, fr in ipairs(g:push(src:sub(i, i + n - 1))) do
      T.eq(#fr, 160)
      got[#got + 1] = fr
    end
    i = i + n
  end
  T.eq(#got, 5000 // 160)
  T.eq(g:pending(), 5000 % 160)
  T.ok(table.concat(got) .. g:flush():sub(1, 5000 % 160) == src, "bytes in order")
end)

T.test("framer flush pads the remainder (0xFF by default) and is nil when empty", function()
  local f = audio.framer(5)
  T.eq(f:flush(), nil)
  f:push("ab")
  T.eq(f:flush(), "ab\xFF\xFF\xFF")
  T.eq(f:pending(), 0)
  T.eq(f:flush(), nil)
  f:push("xyz")
  T.eq(f:flush(0xD5), "xyz\xD5\xD5", "A-law silence pad")
  f:push("1234")
  f:reset()
  T.eq(f:pending(), 0)
  T.eq(f:flush(), nil)
end)

T.test("framer rejects a bad size or pad byte", function()
  T.raises(function()
    audio.framer(0)
  end, "frame size")
  T.raises(function()
    audio.framer(-160)
  end, "frame size")
  T.raises(function()
    local f = audio.framer(2)
    f:push("a")
    f:flush(256)
  end, "pad")
end)

T.test("NaN, infinite, fractional and out-of-range numbers are argument errors", function()
  local f = audio.framer(4)
  local calls = {
    { "resampler", function(x) return audio.resampler(x, 8000) end, "number has no integer representation" },
    { "resampler to", function(x) return audio.resampler(8000, x) end, "number has no integer representation" },
    { "resample_linear", function(x) return audio.resample_linear("ab", x, 8000) end,
      "number has no integer representation" },
    { "framer", function(x) return audio.framer(x) end, "number has no integer representation" },
    { "flush", function(x) f:push("a") return f:flush(x) end, "number has no integer representation" },
  }
  for _, c in ipairs(calls) do
    for _, x in ipairs({ 0 / 0, math.huge, -math.huge, 1.5, 2 ^ 63 }) do
      T.raises(function() c[2](x) end, c[3], c[1] .. "(" .. tostring(x) .. ")")
    end
  end
  for _, x in ipairs({ math.mininteger, -1, math.maxinteger }) do
    T.raises(function() audio.resampler(x, 8000) end, "rate must be")
    T.raises(function() audio.resample_linear("ab", 8000, x) end, "rate must be")
    T.raises(function() audio.framer(x) end, "frame size")
    T.raises(function() f:flush(x) end, "pad must be")
  end
end)

-- speed (diagnostics, not asserted) ----------------------------------------

T.test("speed of 20 ms chunks (diagnostic)", function()
  local function bench(name, n, fn)
    local t0, i = timer.now(), 0
    -- At most n runs or about 0.4 s, so sanitizer builds stay quick.
    while i < n do
      fn()
      i = i + 1
      if i % 1000 == 0 and timer.now() - t0 > 400 then
        break
      end
    end
    local ns = (timer.now() - t0) * 1e6 / i
    T.diag(string.format("%s: %.0f ns per chunk (%d chunks)", name, ns, i))
    return i
  end
  local pcm24, pcm8 = tone(1000, 24000, 0.02, 0.5), tone(1000, 8000, 0.02, 0.5)
  local ulaw = audio.ulaw_encode(pcm8)
  local down, up = audio.resampler(24000, 8000), audio.resampler(8000, 24000)
  local out
  T.ge(bench("24k->8k resample, 960 bytes", 100000, function()
    out = down:process(pcm24)
  end), 1000)
  T.eq(#out, 320)
  bench("8k->24k resample, 320 bytes", 100000, function()
    out = up:process(pcm8)
  end)
  T.eq(#out, 960)
  bench("mu-law encode, 320 -> 160 bytes", 100000, function()
    out = audio.ulaw_encode(pcm8)
  end)
  bench("mu-law decode, 160 -> 320 bytes", 100000, function()
    out = audio.ulaw_decode(ulaw)
  end)
  T.eq(out, audio.ulaw_decode(ulaw))
  local f = audio.framer(160)
  bench("framer push of 160 bytes", 100000, function()
    out = f:push(ulaw)
  end)
  T.eq(#out, 1)
end)

T.run()
