// dsp_check.mjs: measures the mock phone's DSP (providers/mock/dsp.js) in
// Node, for tests/test_mock_browser.lua. Prints one JSON line:
//   encodeSha256     hex SHA-256 of ulawEncode(x) for x = -32768..32767, in
//                    order (to compare with callagent.audio.ulaw_encode)
//   decode           ULAW_DECODE as an array of 256 numbers
//   capture          {"48000": {gains: {Hz: dB}, taps}, "44100": ...}: the
//                    decimator to 8 kHz, with the configuration
//                    capture-worklet.js uses; the gain of a tone at Hz, as
//                    it comes out at 8 kHz (above 4 kHz: what aliases)
//   playback         {"48000": {passDb: {Hz: dB}, imageDb: {Hz: dB}, taps}}:
//                    the interpolator from 8 kHz as in playback-worklet.js;
//                    passDb the tone's own gain, imageDb the level of its
//                    image at 8000 - Hz relative to a full-scale tone
//   seamless         {ratio, identical}: the largest step between output
//                    samples of a tone pushed in odd-sized blocks over that
//                    of one block (1: no clicks at block joins), and whether
//                    the samples are the same
//   playbackSim      playback-worklet.js run here at 48 kHz with stand-ins
//                    for the AudioWorklet globals:
//     burst: 10 s of tone with a mark per 20 ms, all at once (the queue
//       grows): sameAsReference (the output is exactly the interpolated
//       input, in order, nothing lost), marksInOrder, worstMarkError (8 kHz
//       samples between a mark's chunk end and the played position when it
//       was reported: the filter's delay, 13, plus up to one render
//       quantum, 21.3), starved
//     clear: 2 s queued, 0.5 s played, then clear: silentAfter (every sample
//       after it is 0), droppedMs, marksAfter (marks reported after it)
//     paced: 3 s in 20 ms chunks at real time: starved, gaps (runs of 32+
//       zero samples between the start and the end of the sound)
//   captureSim       capture-worklet.js run here at 44.1 kHz on 2 s of
//                    800 Hz: frames, allFull (160 bytes each), hz, dbfs
import { createHash } from "node:crypto";
import { ulawEncode, ULAW_DECODE, Resampler } from "../../providers/mock/dsp.js";

const CAPTURE = { passband: 3200, stopband: 4000, attenuation: 60 };
const PLAYBACK = { passband: 3400, stopband: 4600, attenuation: 60 };

function tone(rate, hz, seconds) {
  const x = new Float32Array(Math.round(rate * seconds));
  for (let i = 0; i < x.length; i++) x[i] = 0.5 * Math.sin((2 * Math.PI * hz * i) / rate);
  return x;
}

function run(r, x, block) {
  const parts = [];
  for (let i = 0; i < x.length; i += block) parts.push(Float32Array.from(r.push(x.subarray(i, i + block))));
  const n = parts.reduce((a, p) => a + p.length, 0);
  const y = new Float32Array(n);
  let o = 0;
  for (const p of parts) {
    y.set(p, o);
    o += p.length;
  }
  return y;
}

// Amplitude of the component at hz (a least-squares fit of sin and cos) over
// the steady middle of y, in dB relative to amplitude 0.5.
function levelDb(y, rate, hz) {
  const a = Math.floor(y.length / 4);
  const b = Math.floor((3 * y.length) / 4);
  let s = 0;
  let c = 0;
  for (let i = a; i < b; i++) {
    const w = (2 * Math.PI * hz * i) / rate;
    s += y[i] * Math.sin(w);
    c += y[i] * Math.cos(w);
  }
  const amp = (2 * Math.hypot(s, c)) / (b - a);
  return 20 * Math.log10(Math.max(amp, 1e-12) / 0.5);
}

const round = (v) => Math.round(v * 100) / 100;

const enc = new Uint8Array(65536);
for (let x = -32768; x <= 32767; x++) enc[x + 32768] = ulawEncode(x);
const out = {
  encodeSha256: createHash("sha256").update(enc).digest("hex"),
  decode: Array.from(ULAW_DECODE),
  capture: {},
  playback: {},
  seamless: {},
};

for (const rate of [48000, 44100]) {
  const gains = {};
  let taps = 0;
  for (const hz of [300, 1000, 2000, 3000, 3200, 4000, 4500, 5000, 7000, 10000, 15000, 20000]) {
    const r = new Resampler(rate, 8000, CAPTURE);
    taps = r.taps;
    const y = run(r, tone(rate, hz, 1), 128);
    // A tone above 4 kHz comes out at its alias.
    let f = hz % 8000;
    if (f > 4000) f = 8000 - f;
    gains[hz] = round(levelDb(y, 8000, f));
  }
  out.capture[rate] = { gains, taps };

  const passDb = {};
  const imageDb = {};
  let ptaps = 0;
  for (const hz of [300, 1000, 2000, 3000, 3400]) {
    const r = new Resampler(8000, rate, PLAYBACK);
    ptaps = r.taps;
    const y = run(r, tone(8000, hz, 1), 160);
    passDb[hz] = round(levelDb(y, rate, hz));
    imageDb[hz] = round(levelDb(y, rate, 8000 - hz));
  }
  out.playback[rate] = { passDb, imageDb, taps: ptaps };

  // Odd blocks vs one block: the same samples, so no step may be larger.
  const x = tone(8000, 1000, 0.5);
  const maxStep = (y) => {
    let m = 0;
    for (let i = 1; i < y.length; i++) m = Math.max(m, Math.abs(y[i] - y[i - 1]));
    return m;
  };
  const whole = run(new Resampler(8000, rate, PLAYBACK), x, x.length);
  const pieces = run(new Resampler(8000, rate, PLAYBACK), x, 37);
  let same = whole.length === pieces.length;
  for (let i = 0; same && i < whole.length; i++) if (Math.abs(whole[i] - pieces[i]) > 1e-6) same = false;
  out.seamless[rate] = { ratio: round(maxStep(pieces) / maxStep(whole)), identical: same };
}

// The worklets, run outside a browser -------------------------------------------

const registered = {};
globalThis.registerProcessor = (name, cls) => {
  registered[name] = cls;
};
globalThis.AudioWorkletProcessor = class {
  constructor() {
    this.posted = [];
    this.port = { postMessage: (m) => this.posted.push(m), onmessage: null };
  }
};

async function worklet(file, rate, name) {
  globalThis.sampleRate = rate;
  globalThis.currentFrame = 0;
  if (!registered[name]) await import(file);
  const node = new registered[name]();
  const send = (m) => node.port.onmessage({ data: m });
  return { node, send };
}

function quantum(node, out) {
  const ok = node.process([[]], [[out]]);
  globalThis.currentFrame += out.length;
  return ok;
}

function ulawTone(hz, ms) {
  const n = ms * 8;
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = ulawEncode(Math.round(8000 * Math.sin((2 * Math.PI * hz * i) / 8000)));
  return b;
}

async function playbackSim() {
  const RATE = 48000;
  const sim = {};
  {
    const { node, send } = await worklet("../../providers/mock/playback-worklet.js", RATE, "mock-phone-playback");
    const tone10 = ulawTone(1000, 10000);
    for (let k = 0; k < tone10.length / 160; k++) {
      send({ type: "media", bytes: tone10.slice(k * 160, (k + 1) * 160).buffer });
      send({ type: "mark", id: k + 1 });
    }
    // The reference: the same input through a fresh interpolator, then its tail.
    const ref = new Resampler(8000, RATE, PLAYBACK);
    const pcm = new Float32Array(tone10.length);
    for (let i = 0; i < pcm.length; i++) pcm[i] = ULAW_DECODE[tone10[i]] / 32768;
    const want = Float32Array.from([...ref.push(pcm), ...ref.flush()]);
    const got = [];
    const buf = new Float32Array(128);
    const reached = [];
    let seen = 0;
    for (let q = 0; q < (11 * RATE) / 128; q++) {
      quantum(node, buf);
      got.push(...buf);
      for (; seen < node.posted.length; seen++) {
        const m = node.posted[seen];
        if (m.type === "marks") for (const id of m.ids) reached.push([id, (node.playedAudio * 8000) / RATE]);
      }
    }
    // Playback starts after the prebuffer: line up the first sounding samples.
    const start = got.findIndex((v) => v !== 0) - want.findIndex((v) => v !== 0);
    let same = start >= 0;
    for (let i = 0; same && i < want.length; i++) if (Math.abs(got[start + i] - want[i]) > 1e-7) same = false;
    let inOrder = reached.length === tone10.length / 160;
    let worst = 0;
    reached.forEach(([id, played], i) => {
      if (id !== i + 1) inOrder = false;
      worst = Math.max(worst, Math.abs(played - id * 160));
    });
    sim.burst = {
      sameAsReference: same,
      marksInOrder: inOrder,
      marks: reached.length,
      worstMarkError: round(worst),
      starved: node.starved,
    };
  }
  {
    const { node, send } = await worklet("../../providers/mock/playback-worklet.js", RATE, "mock-phone-playback");
    const t = ulawTone(1000, 2000);
    for (let k = 0; k < t.length / 160; k++) {
      send({ type: "media", bytes: t.slice(k * 160, (k + 1) * 160).buffer });
      send({ type: "mark", id: k + 1 });
    }
    const buf = new Float32Array(128);
    while (node.playedAudio < RATE / 2) quantum(node, buf);
    const before = node.posted.length;
    send({ type: "clear" });
    let silent = true;
    for (let q = 0; q < 100; q++) {
      quantum(node, buf);
      if (buf.some((v) => v !== 0)) silent = false;
    }
    const stats = node.posted.slice(before).filter((m) => m.type === "stats").pop();
    const marksAfter = node.posted.slice(before).filter((m) => m.type === "marks").length;
    sim.clear = {
      silentAfter: silent,
      droppedMs: stats.dropped / 8,
      playedAtClearMs: stats.playedAtClear / 8,
      marksAfter,
    };
  }
  {
    const { node, send } = await worklet("../../providers/mock/playback-worklet.js", RATE, "mock-phone-playback");
    const t = ulawTone(1000, 3000);
    const buf = new Float32Array(128);
    const got = [];
    let k = 0;
    for (let q = 0; q < (4 * RATE) / 128; q++) {
      // A chunk every 20 ms of audio time, as a paced stream delivers them.
      while (k < t.length / 160 && k * 960 <= globalThis.currentFrame) {
        send({ type: "media", bytes: t.slice(k * 160, (k + 1) * 160).buffer });
        k++;
      }
      quantum(node, buf);
      got.push(...buf);
    }
    const first = got.findIndex((v) => v !== 0);
    let last = got.length - 1;
    while (last > 0 && got[last] === 0) last--;
    let gaps = 0;
    let zeros = 0;
    for (let i = first; i <= last; i++) {
      if (got[i] === 0) {
        zeros++;
        if (zeros === 32) gaps++;
      } else zeros = 0;
    }
    sim.paced = { starved: node.starved, gaps, playedMs: round((node.playedAudio / RATE) * 1000) };
  }
  return sim;
}

async function captureSim() {
  const RATE = 44100;
  const { node } = await worklet("../../providers/mock/capture-worklet.js", RATE, "mock-phone-capture");
  const x = tone(RATE, 800, 2);
  for (let i = 0; i + 128 <= x.length; i += 128) {
    node.process([[x.subarray(i, i + 128)]], []);
    globalThis.currentFrame += 128;
  }
  const frames = node.posted.filter((m) => m.type === "frame").map((m) => new Uint8Array(m.bytes));
  const all = new Float32Array(frames.length * 160);
  frames.forEach((f, j) => f.forEach((c, i) => (all[j * 160 + i] = ULAW_DECODE[c] / 32768)));
  const mid = all.subarray(1600, all.length - 1600);
  let crossings = 0;
  let energy = 0;
  for (let i = 0; i < mid.length; i++) {
    if (i > 0 && mid[i - 1] < 0 !== mid[i] < 0) crossings++;
    energy += mid[i] * mid[i];
  }
  return {
    frames: frames.length,
    allFull: frames.every((f) => f.length === 160),
    hz: round(crossings / 2 / (mid.length / 8000)),
    dbfs: round(10 * Math.log10(energy / mid.length)),
  };
}

out.playbackSim = await playbackSim();
out.captureSim = await captureSim();

process.stdout.write(JSON.stringify(out) + "\n");
