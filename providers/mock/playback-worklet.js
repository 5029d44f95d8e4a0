// playback-worklet.js: the loudspeaker side of the mock phone.
//
// The page posts what the agent's stream carries, in order:
//   {type: "media", bytes: ArrayBuffer}  mu-law 8 kHz, any length: decoded,
//                                        FIR-interpolated to the context rate
//                                        (dsp.js) and queued
//   {type: "mark", id}                   a mark at the current end of the queue
//   {type: "clear"}                      drop everything unplayed, now
// and gets back
//   {type: "marks", ids: [...]}          marks playback has reached, in order
//   {type: "stats", played, peak, dropped, playedAtClear, starved, buffered}
//       every 50 ms and after a clear: played, dropped (by clears) and
//       playedAtClear (played when the last clear came) in 8 kHz samples;
//       peak the output's peak over the last ~100 ms (0..1); starved the
//       times the queue ran dry while audio kept coming; buffered the queue
//       in ms
//
// The queue is a ring buffer that doubles when full, so nothing is lost or
// reordered. Playback starts once 80 ms are queued (or when nothing more has
// come for 40 ms), which absorbs the network's jitter; when the queue runs
// dry the interpolator's last few samples (its delay) are let out first and
// then silence plays until audio comes again. A mark's position counts those
// held-back samples, so it is reached exactly when the audio before it has
// played.
import { Resampler, ULAW_DECODE } from "./dsp.js";

const PREBUFFER_S = 0.08;
const IDLE_S = 0.04;
const STATS_S = 0.05;

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(8000, sampleRate, { passband: 3400, stopband: 4600, attenuation: 60 });
    this.held = Math.ceil(this.resampler.delayOut); // output samples inside the filter
    this.ring = new Float32Array(1 << Math.ceil(Math.log2(sampleRate * 4)));
    this.written = 0; // output samples queued, since the start
    this.played = 0; // the queue's read position (output samples)
    this.playedAudio = 0; // output samples actually played (not dropped, not silence)
    this.tail = false; // the filter holds input not yet let out
    this.playing = false;
    this.lastInput = -Infinity; // currentFrame of the last media
    this.marks = []; // {id, pos}: reached when played >= pos
    this.pcm = new Float32Array(1024);
    this.prebuffer = Math.round(PREBUFFER_S * sampleRate);
    this.idle = Math.round(IDLE_S * sampleRate);
    this.statsEvery = Math.round(STATS_S * sampleRate);
    this.nextStats = 0;
    this.peak = 0;
    this.prevPeak = 0;
    this.dropped = 0;
    this.playedAtClear = 0;
    this.starved = 0;
    this.running = true;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(m) {
    if (m.type === "media") {
      this.queue(new Uint8Array(m.bytes));
    } else if (m.type === "mark") {
      this.marks.push({ id: m.id, pos: this.written + (this.tail ? this.held : 0) });
    } else if (m.type === "clear") {
      const unplayed = this.written - this.played + (this.tail ? this.held : 0);
      this.dropped += unplayed;
      this.playedAtClear = this.playedAudio;
      this.played = this.written;
      this.resampler.reset();
      this.tail = false;
      this.playing = false;
      this.marks.length = 0; // the page echoes them itself, at once
      this.postStats();
    } else if (m.type === "stop") {
      this.running = false;
    }
  }

  queue(ulaw) {
    if (ulaw.length === 0) return;
    if (this.pcm.length < ulaw.length) this.pcm = new Float32Array(2 * ulaw.length);
    const pcm = this.pcm;
    for (let i = 0; i < ulaw.length; i++) pcm[i] = ULAW_DECODE[ulaw[i]] / 32768;
    this.write(this.resampler.push(pcm.subarray(0, ulaw.length)));
    this.tail = true;
    this.lastInput = currentFrame;
  }

  write(samples) {
    const n = samples.length;
    let ring = this.ring;
    const used = this.written - this.played;
    if (used + n > ring.length) {
      let size = ring.length * 2;
      while (used + n > size) size *= 2;
      const bigger = new Float32Array(size);
      for (let i = 0, r = this.played; i < used; i++, r++) bigger[r & (size - 1)] = ring[r & (ring.length - 1)];
      this.ring = ring = bigger;
    }
    const mask = ring.length - 1;
    let w = this.written;
    for (let i = 0; i < n; i++) ring[w++ & mask] = samples[i];
    this.written = w;
  }

  letTailOut() {
    this.write(this.resampler.flush());
    this.tail = false;
  }

  process(inputs, outputs) {
    if (!this.running) return false;
    const out = outputs[0][0];
    const n = out.length;
    const quiet = currentFrame - this.lastInput >= this.idle;
    if (!this.playing) {
      if (this.tail && quiet) this.letTailOut();
      const avail = this.written - this.played;
      if (avail >= this.prebuffer || (avail > 0 && quiet)) this.playing = true;
    }
    let take = 0;
    if (this.playing) {
      if (this.written - this.played < n && this.tail) this.letTailOut();
      take = Math.min(n, this.written - this.played);
      const ring = this.ring;
      const mask = ring.length - 1;
      let r = this.played;
      let peak = this.peak;
      for (let i = 0; i < take; i++) {
        const v = ring[r++ & mask];
        out[i] = v;
        const a = v < 0 ? -v : v;
        if (a > peak) peak = a;
      }
      this.peak = peak;
      this.played = r;
      this.playedAudio += take;
      if (take < n) {
        this.playing = false;
        if (!quiet) this.starved++;
      }
    }
    out.fill(0, take);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);

    const marks = this.marks;
    if (marks.length > 0 && marks[0].pos <= this.played) {
      const ids = [];
      while (marks.length > 0 && marks[0].pos <= this.played) ids.push(marks.shift().id);
      this.port.postMessage({ type: "marks", ids });
    }
    if (currentFrame >= this.nextStats) {
      this.nextStats = currentFrame + this.statsEvery;
      this.postStats();
    }
    return true;
  }

  postStats() {
    const to8k = 8000 / sampleRate;
    const peak = Math.max(this.peak, this.prevPeak);
    this.prevPeak = this.peak;
    this.peak = 0;
    this.port.postMessage({
      type: "stats",
      played: Math.round(this.playedAudio * to8k),
      dropped: Math.round(this.dropped * to8k),
      playedAtClear: Math.round(this.playedAtClear * to8k),
      peak: Math.min(1, peak),
      starved: this.starved,
      buffered: Math.round(((this.written - this.played) / sampleRate) * 1000),
    });
  }
}

registerProcessor("mock-phone-playback", PlaybackProcessor);
