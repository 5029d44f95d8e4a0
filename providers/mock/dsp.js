// dsp.js: the mock phone's signal processing, shared by both audio worklets
// (and importable from Node for tests: no browser APIs here).
//
//   ulawEncode(x)        int16 sample -> mu-law byte (ITU-T G.191, like
//                        callagent's src/audio.c: encode(0) = 0xFF,
//                        encode(-1) = 0x7F, no zero trap)
//   ULAW_DECODE          Int16Array(256): mu-law byte -> int16
//   new Resampler(inRate, outRate, {passband, stopband, attenuation})
//     r.push(Float32Array) -> Float32Array of output samples (a view into a
//                        buffer reused by the next call: copy what you keep)
//     r.flush()          pushes zeros through the filter so that the input
//                        given so far comes out in full (the filter's delay)
//     r.reset()          forgets the history (as after a clear)
//     r.delayOut         the filter's group delay, in output samples
//     r.taps             taps per output sample
//
// The resampler is a rational polyphase FIR: with g = gcd(in, out), L =
// out/g and M = in/g, output k sits at input time k*M/L and is the sum of T
// input samples weighted by phase (k*M mod L) of a Kaiser-windowed sinc
// designed at the rate in*L. Its cutoff is the middle of [passband,
// stopband], its length follows from the transition width and the
// attenuation (Kaiser's formula). Any pair of integer rates works the same
// way: 48 kHz <-> 8 kHz uses 1 or 6 phases, 44.1 kHz <-> 8 kHz 80 or 441.
// History is kept across calls, so blocks join without clicks.

// G.711 mu-law, G.191 algorithm (ulaw_compress / ulaw_expand) ---------------

// The encoder only looks at the top 14 bits (x >> 2), so it is one table.
const ENC = new Uint8Array(1 << 14);
export const ULAW_DECODE = new Int16Array(256);

function compress(x) {
  let absno = x < 0 ? ((~x) >> 2) + 33 : (x >> 2) + 33;
  if (absno > 0x1fff) absno = 0x1fff;
  let i = absno >> 6;
  let segno = 1;
  while (i !== 0) {
    segno++;
    i >>= 1;
  }
  const high = 8 - segno;
  const low = 15 - ((absno >> segno) & 15);
  const out = (high << 4) | low;
  return x >= 0 ? out | 0x80 : out;
}

function expand(code) {
  const sign = code < 0x80 ? -1 : 1;
  const m = ~code;
  const exponent = (m >> 4) & 7;
  const step = 4 << (exponent + 1);
  return sign * ((0x80 << exponent) + step * (m & 15) + step / 2 - 4 * 33);
}

for (let i = 0; i < 1 << 14; i++) {
  // i is the top 14 bits of a 16-bit two's complement sample.
  const x = (i << 2) >= 32768 ? (i << 2) - 65536 : i << 2;
  ENC[i] = compress(x);
}
for (let c = 0; c < 256; c++) ULAW_DECODE[c] = expand(c);

export function ulawEncode(x) {
  return ENC[(x >> 2) & 0x3fff];
}

// Float in [-1, 1) -> mu-law byte (rounded, clamped to int16 first).
export function ulawEncodeFloat(f) {
  let x = Math.round(f * 32768);
  if (x > 32767) x = 32767;
  else if (x < -32768) x = -32768;
  return ENC[(x >> 2) & 0x3fff];
}

// FIR design ------------------------------------------------------------------

function besselI0(x) {
  let sum = 1;
  let term = 1;
  const y = (x * x) / 4;
  for (let k = 1; k < 200; k++) {
    term *= y / (k * k);
    sum += term;
    if (term < sum * 1e-15) break;
  }
  return sum;
}

function kaiserBeta(att) {
  if (att > 50) return 0.1102 * (att - 8.7);
  if (att >= 21) return 0.5842 * Math.pow(att - 21, 0.4) + 0.07886 * (att - 21);
  return 0;
}

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

export class Resampler {
  constructor(inRate, outRate, opts = {}) {
    if (!(inRate > 0 && outRate > 0) || inRate % 1 || outRate % 1) {
      throw new RangeError(`resampler: rates must be positive integers (${inRate}, ${outRate})`);
    }
    const g = gcd(inRate, outRate);
    const L = outRate / g;
    const M = inRate / g;
    if (L > 4096) throw new RangeError(`resampler: ${inRate} -> ${outRate} Hz needs ${L} phases`);
    const low = Math.min(inRate, outRate) / 2; // the lower Nyquist frequency
    const pass = opts.passband ?? 0.85 * low;
    const stop = opts.stopband ?? low;
    const att = opts.attenuation ?? 60;
    const cutoff = (pass + stop) / 2;
    // Kaiser: taps = (A - 8) / (2.285 * dw), dw the transition in rad/sample
    // at the input rate; T taps per phase cover that many input samples.
    const dw = (2 * Math.PI * (stop - pass)) / inRate;
    const T = Math.max(2, Math.ceil((att - 8) / (2.285 * dw)) + 1);
    const N = T * L;
    const hi = inRate * L; // the rate the prototype is designed at
    const fc = cutoff / hi; // cycles per high-rate sample
    const beta = kaiserBeta(att);
    const i0b = besselI0(beta);
    const mid = (N - 1) / 2;
    const coef = new Float32Array(N);
    for (let n = 0; n < N; n++) {
      const t = n - mid;
      const sinc = t === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * t) / (Math.PI * t);
      const r = t / mid;
      const w = besselI0(beta * Math.sqrt(Math.max(0, 1 - r * r))) / i0b;
      // Gain L: the zero-stuffed high-rate signal has 1/L of the energy.
      coef[(n % L) * T + Math.floor(n / L)] = L * sinc * w;
    }
    this.L = L;
    this.M = M;
    this.taps = T;
    this.coef = coef;
    this.delayOut = mid / M;
    this.buf = new Float32Array(T - 1 + 1024);
    this.out = new Float32Array(256);
    this.reset();
  }

  reset() {
    // T - 1 zeros of history, then the first output is at the first input.
    this.buf.fill(0, 0, this.taps - 1);
    this.len = this.taps - 1;
    this.pos = this.taps - 1;
    this.phase = 0;
  }

  push(input) {
    const T = this.taps;
    const L = this.L;
    const M = this.M;
    if (this.len + input.length > this.buf.length) {
      const b = new Float32Array(2 * (this.len + input.length));
      b.set(this.buf.subarray(0, this.len));
      this.buf = b;
    }
    const buf = this.buf;
    buf.set(input, this.len);
    const len = (this.len += input.length);
    const most = Math.ceil(((len - this.pos + 1) * L) / M) + 1;
    if (this.out.length < most) this.out = new Float32Array(2 * most);
    const out = this.out;
    const coef = this.coef;
    let pos = this.pos;
    let ph = this.phase;
    let n = 0;
    while (pos < len) {
      const c0 = ph * T;
      let acc = 0;
      for (let j = 0; j < T; j++) acc += coef[c0 + j] * buf[pos - j];
      out[n++] = acc;
      ph += M;
      if (ph >= L) {
        pos += Math.floor(ph / L);
        ph %= L;
      }
    }
    // Keep the T - 1 samples before the next output's newest one.
    const keep = Math.min(pos - (T - 1), len);
    if (keep > 0) {
      buf.copyWithin(0, keep, len);
      this.len = len - keep;
      pos -= keep;
    }
    this.pos = pos;
    this.phase = ph;
    return out.subarray(0, n);
  }

  flush() {
    return this.push(new Float32Array(Math.ceil(this.taps / 2) + 1));
  }
}
