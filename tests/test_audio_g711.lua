-- callagent.audio against the standard, input by input: G.711 mu-law and
-- A-law for all 65536 samples and all 256 codes against the ITU-T G.191
-- reference algorithm written out below, and the resampler's streaming and
-- edge contracts (every split of a stream, odd bytes, full scale, DC, the
-- first samples, empty and one-byte chunks, misuse from Lua).
local T = require "testing"
local audio = require "callagent.audio"

-- The G.191 reference (g711.c), from the algorithm in the standard -----------

--- ulaw_compress: the biased magnitude ((|x| >> 2) + 33, |x| of a negative
-- x being its one's complement), clipped to 0x1FFF (|x| <= 32635: the bias
-- 0x84 and clip 32635 of the 16-bit form), then the segment search; the
-- code is the complement of segment and step, 0x80 for x >= 0.
local function ref_ulaw_compress(x)
  local absno = (x < 0 and (~x) >> 2 or x >> 2) + 33
  if absno > 0x1FFF then
    absno = 0x1FFF
  end
  local i, segno = absno >> 6, 1
  while i ~= 0 do
    segno = segno + 1
    i = i >> 1
  end
  local high = 8 - segno
  local low = 0xF - ((absno >> segno) & 0xF)
  local code = (high << 4) | low
  if x >= 0 then
    code = code | 0x80
  end
  return code
end

--- ulaw_expand: the middle of the code's interval, unbiased.
local function ref_ulaw_expand(code)
  local sign = code < 0x80 and -1 or 1
  local m = (~code) & 0xFF
  local exponent = (m >> 4) & 7
  local step = 4 << (exponent + 1)
  return sign * ((0x80 << exponent) + step * (m & 0xF) + step // 2 - 4 * 33)
end

--- alaw_compress: |x| >> 4 (one's complement for x < 0), segment 0 linear,
-- then the segment search; even bits toggled with 0x55.
local function ref_alaw_compress(x)
  local ix = x < 0 and (~x) >> 4 or x >> 4
  if ix > 15 then
    local iexp = 1
    while ix > 16 + 15 do
      ix = ix >> 1
      iexp = iexp + 1
    end
    ix = ix - 16 + (iexp << 4)
  end
  if x >= 0 then
    ix = ix | 0x80
  end
  return ix ~ 0x55
end

local function ref_alaw_expand(code)
  local ix = (code ~ 0x55) & 0x7F
  local iexp, mant = ix >> 4, ix & 0xF
  if iexp > 0 then
    mant = mant + 16
  end
  mant = (mant << 4) + 8
  if iexp > 1 then
    mant = mant << (iexp - 1)
  end
  return code > 127 and mant or -mant
end

--- Every 16-bit sample, -32768 .. 32767, as one PCM string.
local function all_samples()
  local t = {}
  for hi = -32768, 32767, 256 do
    local row = {}
    for x = hi, hi + 255 do
      row[#row + 1] = x
    end
    t[#t + 1] = string.pack("<" .. ("i2"):rep(256), table.unpack(row))
  end
  return table.concat(t)
end

local function all_codes()
  local t = {}
  for c = 0, 255 do
    t[#t + 1] = string.char(c)
  end
  return table.concat(t)
end

--- The first sample where got and want differ, as a message, or nil.
local function first_diff_codes(got, want, what)
  if got == want then
    return nil
  end
  for i = 1, math.max(#got, #want) do
    if got:byte(i) ~= want:byte(i) then
      return string.format("%s: input %d gives %s, the reference %s", what, i - 32769,
        tostring(got:byte(i)), tostring(want:byte(i)))
    end
  end
end

T.test("mu-law encode matches G.191 ulaw_compress for all 65536 inputs", function()
  local want = {}
  for x = -32768, 32767 do
    want[#want + 1] = string.char(ref_ulaw_compress(x))
  end
  want = table.concat(want)
  local got = audio.ulaw_encode(all_samples())
  T.eq(#got, 65536)
  T.eq(first_diff_codes(got, want, "mu-law"), nil)
  -- The conventions, spelled out: 0 and -1 are the two zero codes; the clip.
  T.eq(ref_ulaw_compress(0), 0xFF)
  T.eq(ref_ulaw_compress(-1), 0x7F)
  T.eq(ref_ulaw_compress(32767), 0x80)
  T.eq(ref_ulaw_compress(-32768), 0x00)
end)

T.test("mu-law decode matches G.191 ulaw_expand for all 256 codes", function()
  local want = {}
  for c = 0, 255 do
    want[#want + 1] = string.pack("<i2", ref_ulaw_expand(c))
  end
  T.eq(audio.ulaw_decode(all_codes()), table.concat(want))
  T.eq(ref_ulaw_expand(0xFF), 0)
  T.eq(ref_ulaw_expand(0x7F), 0)
  T.eq(ref_ulaw_expand(0x80), 32124)
end)

T.test("A-law encode matches G.191 alaw_compress for all 65536 inputs", function()
  local want = {}
  for x = -32768, 32767 do
    want[#want + 1] = string.char(ref_alaw_compress(x))
  end
  want = table.concat(want)
  local got = audio.alaw_encode(all_samples())
  T.eq(#got, 65536)
  T.eq(first_diff_codes(got, want, "A-law"), nil)
  T.eq(ref_alaw_compress(0), 0xD5)
  T.eq(ref_alaw_compress(-1), 0x55)
end)

T.test("A-law decode matches G.191 alaw_expand for all 256 codes", function()
  local want = {}
  for c = 0, 255 do
    want[#want + 1] = string.pack("<i2", ref_alaw_expand(c))
  end
  T.eq(audio.alaw_decode(all_codes()), table.concat(want))
  T.eq(ref_alaw_expand(0xD5), 8)
  T.eq(ref_alaw_expand(0xAA), 32256)
end)

T.test("mu-law <-> A-law transcoders are the reference encode of the reference decode", function()
  local u2a, a2u = {}, {}
  for c = 0, 255 do
    u2a[#u2a + 1] = string.char(ref_alaw_compress(ref_ulaw_expand(c)))
    a2u[#a2u + 1] = string.char(ref_ulaw_compress(ref_alaw_expand(c)))
  end
  T.eq(audio.ulaw_to_alaw(all_codes()), table.concat(u2a))
  T.eq(audio.alaw_to_ulaw(all_codes()), table.concat(a2u))
end)

-- resampler ---------------------------------------------------------------

local PAIRS = {
  { 24000, 8000 }, { 8000, 24000 }, { 16000, 8000 }, { 8000, 16000 }, { 24000, 16000 }, { 16000, 24000 },
  { 8000, 8000 },
}

--- Reproducible noise over the whole 16-bit range, n samples.
local function noise(n, seed)
  local t = {}
  for i = 1, n do
    seed = (seed * 1103515245 + 12345) % 2147483648
    t[i] = string.pack("<i2", (seed >> 8) % 65536 - 32768)
  end
  return table.concat(t)
end

local function samples(pcm)
  local out = {}
  for i = 1, #pcm - 1, 2 do
    out[#out + 1] = string.unpack("<i2", pcm, i)
  end
  return out
end

local function tone(hz, rate, n, amp)
  local t, w = {}, 2 * math.pi * hz / rate
  for i = 0, n - 1 do
    t[#t + 1] = string.pack("<i2", math.floor(amp * 32767 * math.sin(w * i) + 0.5))
  end
  return table.concat(t)
end

--- The amplitude of hz in y[first..] by a single-bin DFT (a Hann window,
-- so a strong tone elsewhere does not leak into the bin).
local function dft_amp(y, rate, hz, first)
  local n = #y - first + 1
  local w = 2 * math.pi * hz / rate
  local re, im, wsum = 0, 0, 0
  for i = 0, n - 1 do
    local h = 0.5 - 0.5 * math.cos(2 * math.pi * i / (n - 1))
    re = re + h * y[first + i] * math.cos(w * i)
    im = im + h * y[first + i] * math.sin(w * i)
    wsum = wsum + h
  end
  return 2 * math.sqrt(re * re + im * im) / wsum
end

T.test("a stream split at every byte gives the output of one whole call", function()
  -- 1300 samples: more than one internal block of 512, so block edges are crossed too.
  for _, p in ipairs(PAIRS) do
    local from, to = p[1], p[2]
    local input = noise(1300, from + to)
    local whole = audio.resampler(from, to):process(input)
    local bad
    for cut = 0, #input do
      local r = audio.resampler(from, to)
      local got = r:process(input:sub(1, cut)) .. r:process(input:sub(cut + 1))
      if got ~= whole then
        bad = bad or cut
      end
    end
    T.eq(bad, nil, from .. "->" .. to .. ": first split that differs")
  end
end)

T.test("a stream in chunks of every size from 1 to 1100 bytes gives the output of one whole call", function()
  local input = noise(1300, 99)
  for _, p in ipairs({ { 24000, 8000 }, { 8000, 24000 }, { 24000, 16000 } }) do
    local from, to = p[1], p[2]
    local whole = audio.resampler(from, to):process(input)
    local bad
    for size = 1, 1100 do
      local r, out = audio.resampler(from, to), {}
      for i = 1, #input, size do
        out[#out + 1] = r:process(input:sub(i, i + size - 1))
      end
      if table.concat(out) ~= whole then
        bad = bad or size
      end
    end
    T.eq(bad, nil, from .. "->" .. to .. ": first chunk size that differs")
  end
end)

T.test("a half sample at a chunk end is joined with the next chunk, through every rate pair", function()
  for _, p in ipairs(PAIRS) do
    local from, to = p[1], p[2]
    local input = noise(301, 7)
    local r, out = audio.resampler(from, to), {}
    -- Odd chunks only: every chunk leaves or completes a half sample.
    local i = 1
    for _, n in ipairs({ 1, 1, 3, 5, 1, 7, 99, 1, 1, 1, 203, 79 }) do
      out[#out + 1] = r:process(input:sub(i, i + n - 1))
      i = i + n
    end
    out[#out + 1] = r:process(input:sub(i))
    T.eq(table.concat(out), audio.resampler(from, to):process(input), from .. "->" .. to)
  end
end)

T.test("a 2 MiB chunk (and an odd byte) gives the output of 20 ms pieces, of exact length", function()
  local input = noise(4096, 5):rep(256) .. "\x01"
  for _, p in ipairs({ { 24000, 8000 }, { 8000, 24000 } }) do
    local from, to = p[1], p[2]
    local whole = audio.resampler(from, to):process(input)
    local r, out = audio.resampler(from, to), {}
    for i = 1, #input, 960 do
      out[#out + 1] = r:process(input:sub(i, i + 959))
    end
    T.eq(#whole, 2 * -((-(#input // 2) * to) // from), from .. "->" .. to .. " length")
    T.ok(table.concat(out) == whole, from .. "->" .. to .. " same bytes")
  end
end)

T.test("empty and one-byte chunks: no output until a sample is whole, then the same output", function()
  for _, p in ipairs(PAIRS) do
    local from, to = p[1], p[2]
    local r = audio.resampler(from, to)
    T.eq(r:process(""), "", "empty")
    T.eq(r:process("\x10"), "", "half a sample")
    T.eq(r:process(""), "", "empty keeps the half sample")
    local a = r:process("\x20")
    T.eq(a, audio.resampler(from, to):process("\x10\x20"), from .. "->" .. to .. " joined")
  end
end)

T.test("24k->8k: a 1 kHz tone passes within 0.5 dB and 5 kHz is stopped by >= 70 dB (DFT)", function()
  local r1, r5 = audio.resampler(24000, 8000), audio.resampler(24000, 8000)
  local first = math.ceil(2 * r1:delay()) + 16
  local n = 4800
  local out1 = samples(r1:process(tone(1000, 24000, n, 0.5)))
  local out5 = samples(r5:process(tone(5000, 24000, n, 0.9)))
  local level1 = 20 * math.log(dft_amp(out1, 8000, 1000, first) / (0.5 * 32767), 10)
  -- 5 kHz at 24 kHz in folds to 3 kHz at 8 kHz out: look there, and at 5 kHz's own bin for good measure.
  local alias = dft_amp(out5, 8000, 3000, first)
  local alias_db = 20 * math.log(math.max(alias, 1e-3) / (0.9 * 32767), 10)
  T.diag(string.format("24k->8k: 1 kHz %+.3f dB; 5 kHz aliased to 3 kHz at %.1f dB", level1, alias_db))
  T.near(level1, 0, 0.5, "1 kHz level")
  T.le(alias_db, -70, "5 kHz does not alias into the band")
end)

T.test("full-scale input clips at the int16 limits, never wraps", function()
  -- A full-scale square wave rings over full scale in any low-pass: those
  -- outputs must clip to 32767 / -32768, not wrap to the other sign.
  for _, p in ipairs(PAIRS) do
    local from, to = p[1], p[2]
    local sq = {}
    local period = from // 500
    for i = 0, from // 10 - 1 do
      sq[#sq + 1] = string.pack("<i2", (i % period) < period // 2 and 32767 or -32768)
    end
    local out = samples(audio.resampler(from, to):process(table.concat(sq)))
    local lo, hi, flips = 0, 0, 0
    for i = 2, #out do
      lo, hi = math.min(lo, out[i]), math.max(hi, out[i])
      -- A wrap is a jump of about full scale between neighbours; a copy
      -- (equal rates) has the square wave's own edges.
      if from ~= to and math.abs(out[i] - out[i - 1]) > 65000 then
        flips = flips + 1
      end
    end
    T.eq(flips, 0, from .. "->" .. to .. " no wrap-around")
    if from ~= to then
      T.eq(hi, 32767, from .. "->" .. to .. " clips high")
      T.eq(lo, -32768, from .. "->" .. to .. " clips low")
    end
  end
end)

T.test("DC passes at its level once the filter has filled, for every rate pair", function()
  for _, p in ipairs(PAIRS) do
    local from, to = p[1], p[2]
    for _, v in ipairs({ 10000, -32768, 32767, -1, 1 }) do
      local r = audio.resampler(from, to)
      local out = samples(r:process(string.pack("<i2", v):rep(from // 50)))
      local first = math.ceil(2 * r:delay()) + 2
      local worst = 0
      for i = first, #out do
        worst = math.max(worst, math.abs(out[i] - v))
      end
      T.le(worst, 1, string.format("%d->%d DC %d: largest error", from, to, v))
    end
  end
end)

T.test("the first samples of a stream start from silence, with no click", function()
  -- Before the first input only zeros are in the history: the first outputs
  -- of a quiet signal are quiet, whatever the memory held before.
  for _, p in ipairs(PAIRS) do
    local from, to = p[1], p[2]
    -- Dirty memory: a resampler made where a loud one was just collected.
    for _ = 1, 3 do
      audio.resampler(from, to):process(("\xFF\x7F"):rep(2000))
    end
    collectgarbage()
    local r = audio.resampler(from, to)
    local out = samples(r:process(("\0\0"):rep(64) .. string.pack("<i2", 100):rep(64)))
    local biggest = 0
    for _, v in ipairs(out) do
      biggest = math.max(biggest, math.abs(v))
    end
    T.le(biggest, 130, from .. "->" .. to .. " first samples of 0 then 100")
    T.eq(out[1], 0, from .. "->" .. to .. " first sample of silence")
  end
end)

T.test("reset after a loud item: the next item's output is as from a new resampler", function()
  -- The barge-in case: the bridge resets its resampler at clear(); nothing
  -- of the cut item (its history, its phase, a half sample) reaches the next.
  for _, p in ipairs(PAIRS) do
    local from, to = p[1], p[2]
    local r = audio.resampler(from, to)
    r:process(noise(777, 3) .. "\x55")
    r:reset()
    local next_item = tone(440, from, 500, 0.3)
    T.ok(r:process(next_item) == audio.resampler(from, to):process(next_item), from .. "->" .. to)
  end
end)

T.test("misuse from Lua raises: no string, no resampler, a closed-over wrong type", function()
  local r = audio.resampler(24000, 8000)
  T.raises(function()
    r:process()
  end, "string expected")
  T.raises(function()
    r:process({})
  end, "string expected")
  T.raises(function()
    r.process(nil, "ab")
  end, "callagent.Resampler expected")
  T.raises(function()
    r.reset("x")
  end, "callagent.Resampler expected")
  T.raises(function()
    r.delay(audio.framer(4))
  end, "callagent.Resampler expected")
  T.raises(function()
    audio.resampler(24000.5, 8000)
  end)
  T.raises(function()
    audio.resampler("24000x", 8000)
  end)
  T.raises(function()
    audio.resampler(2 ^ 40, 8000)
  end, "rate must be")
  T.raises(function()
    audio.ulaw_encode()
  end, "string expected")
  T.raises(function()
    audio.alaw_decode(nil)
  end, "string expected")
  T.raises(function()
    audio.ulaw_to_alaw(true)
  end, "string expected")
  T.raises(function()
    audio.framer(2 ^ 62)
  end, "frame size")
  T.raises(function()
    audio.framer(4).push(r, "x")
  end, "callagent.Framer expected")
  -- Numbers are strings to Lua's string checks: that is allowed, not misuse.
  T.eq(audio.ulaw_decode(12), audio.ulaw_decode("12"))
end)

T.run()
