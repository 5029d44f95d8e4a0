// capture-worklet.js: the microphone side of the mock phone.
//
// Runs on the audio thread at the context's rate. Each render quantum of the
// first input channel is low-pass filtered and resampled to 8 kHz (dsp.js:
// a polyphase Kaiser-windowed sinc, -6 dB at 3.6 kHz, flat to 3.2 kHz, >= 60
// dB down from 4 kHz where aliasing starts), mu-law encoded (G.191) and cut
// into 160-byte frames (20 ms). Each frame goes to the page as
//   {type: "frame", bytes: ArrayBuffer(160), peak}   (peak: input level 0..1
//   over the frame's time, for the level meter)
// A quantum with no input (muted or ended track) counts as silence, so frames
// keep their pace. The message {type: "stop"} ends the processor.
import { Resampler, ulawEncodeFloat } from "./dsp.js";

const FRAME = 160;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate, 8000, { passband: 3200, stopband: 4000, attenuation: 60 });
    this.frame = new Uint8Array(FRAME);
    this.fill = 0;
    this.peak = 0;
    this.silence = new Float32Array(128);
    this.running = true;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "stop") this.running = false;
    };
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    let x = input && input.length > 0 ? input[0] : null;
    if (!x) {
      if (this.silence.length !== 128) this.silence = new Float32Array(128);
      x = this.silence;
    }
    let peak = this.peak;
    for (let i = 0; i < x.length; i++) {
      const a = x[i] < 0 ? -x[i] : x[i];
      if (a > peak) peak = a;
    }
    this.peak = peak;
    const y = this.resampler.push(x);
    let frame = this.frame;
    let fill = this.fill;
    for (let i = 0; i < y.length; i++) {
      frame[fill++] = ulawEncodeFloat(y[i]);
      if (fill === FRAME) {
        this.port.postMessage({ type: "frame", bytes: frame.buffer, peak: Math.min(1, this.peak) }, [frame.buffer]);
        this.peak = 0;
        frame = new Uint8Array(FRAME);
        fill = 0;
      }
    }
    this.frame = frame;
    this.fill = fill;
    return true;
  }
}

registerProcessor("mock-phone-capture", CaptureProcessor);
