// phone.js: the mock phone page (providers/mock.lua serves it at
// /mock/call/{callId}?t=TOKEN). Opening the page shows the call ringing:
//
//   0. GET /mock/api/ring/{callId}?t=TOKEN, at once and every 500 ms while
//      it rings: whether the link still rings (link "ringing"; "answered",
//      "declined" or "expired" when it stopped) and who is called (the
//      call's id and number, the names it was placed with). A link that no
//      longer rings when the page opens is an error; one that stops while
//      the page rings (ring timeout, hung up through the API, answered or
//      declined in another window) is said so, and the buttons go.
//
// Answer (focused, so Enter or Space answers):
//
//   1. An AudioContext at the device rate, made in the click (a user
//      gesture, so the browser lets it play), with two worklets:
//      capture-worklet.js (mic -> 8 kHz mu-law, 160-byte frames) and
//      playback-worklet.js (agent mu-law -> the context rate, a jitter-safe
//      queue that reports the marks it has played).
//   2. The microphone (getUserMedia, mono, echo cancellation, noise
//      suppression, automatic gain). Refused or missing: a clear message;
//      the call is answered and hung up at once (so it ends now instead of
//      ringing on), no stream.
//   3. POST /mock/api/answer {callId, token} -> {streamUrl, parameters,
//      pollUrl, session}; 403/409/410 mean the link was used or expired.
//      After the microphone: callagent waits 15 s for an answered call's
//      stream, and a person may take longer over the microphone prompt.
//   4. A WebSocket to streamUrl speaking Twilio Media Streams as Twilio does:
//      connected, start (customParameters = the answer's parameters), one
//      media event per 20 ms frame, dtmf from the keypad, marks echoed once
//      played, every pending mark echoed at once on clear, stop on hang-up
//      (Hang up, also while it connects, or leaving the page). A key held
//      down is one dtmf. Hung up here, the agent is silent at once; ended
//      by callagent, what it queued (the goodbye) plays out.
//   5. GET pollUrl every 500 ms: call status, transcript, report, and at
//      the end why it ended (endReason, in plain words, and lastError
//      whatever the status, unless the problem box says it already). A
//      call over before its stream opened ends the page.
//
// Decline, until the answer goes out (also while the microphone prompt is
// open): POST /mock/api/decline {callId, token} -> {attemptStatus "busy",
// status, nextAttemptAt?}; nothing is answered, the microphone is let go.
//
// The microphone lost (its track's `ended`: unplugged, its permission taken
// back) would go on as silence: the page says so and hangs up, as the
// callee. Connected, it asks POST /mock/api/hangup {reason:
// "microphone_lost"} first, so that the call's lastError says why, then
// stops its stream; before that, it hangs up as Hang up does (answered) or
// as a refused microphone does (not yet answered).
//
// Left (pagehide) at any point, the page lets the microphone go (a grant
// that comes after, too). A call it answered is hung up; one it may be
// answering (Answer pressed, the answer's reply not in) is hung up by its
// link's token and the page's id: callagent answers it to hang it up if
// the answer had not come. A page left while it only rang leaves it ringing.
//
// A fault of the page itself (a bug, a browser without something it uses),
// in whatever step (the start, a button, a timer's, an event's): the page
// says so and ends its part of the call. Until its answer went out
// (ringing, or Answer pressed: the microphone prompt, the audio starting),
// POST /mock/api/decline {status: "failed"}; after, it hangs up.
//
// Restored from the browser's back/forward cache (pageshow, persisted), what
// the page shows is from before it was left (a call it hung up then, a ring
// that stopped meanwhile): it loads again, and shows the link as it is now.
//
// For tests: window.mockPhone = {stats, hangup()}. hangup(): Hang up, at
// any point (ringing: as Decline; Answer pressed, not yet in the call: as
// leaving the page then), once, a fault in it the page's. stats: state ("opening"
// | "ringing" | "answering" | "connected" | "ended" | "error" | "mic-denied"
// | "mic-lost" | "declined" | "stopped": it stopped ringing while the page rang), ring
// (the link's view while it rang, then as it stopped), callStatus
// (polled; once declined, the call's status the decline returned),
// sampleRate, framesSent, bytesSent (mu-law sent), mediaReceived (mu-law
// bytes received), playedSamples / playedFrames (agent audio played, at
// 8 kHz / in 20 ms frames), clears, marksReceived, marksEchoed, lastPeak
// (agent output peak over ~100 ms, 0..1), micPeak, droppedOnClear and
// playedAtClear (8 kHz samples), starved (queue ran dry mid-stream),
// bufferedMs, dtmfSent, errors (messages).
import { Resampler } from "./dsp.js";

const $ = (id) => document.getElementById(id);

const stats = {
  state: "opening",
  ring: null,
  callStatus: null,
  sampleRate: 0,
  framesSent: 0,
  bytesSent: 0,
  mediaReceived: 0,
  playedSamples: 0,
  playedFrames: 0,
  clears: 0,
  marksReceived: 0,
  marksEchoed: 0,
  lastPeak: 0,
  micPeak: 0,
  droppedOnClear: 0,
  playedAtClear: 0,
  starved: 0,
  bufferedMs: 0,
  dtmfSent: 0,
  errors: [],
};
// The hang-up of window.mockPhone is Hang up's, run as the buttons' steps
// are (guarded, below: a fault in it is the page's, said on the page).
window.mockPhone = { stats, hangup: () => run(hangUp) };

const call = { id: null, token: null, session: null, streamUrl: null, parameters: null, pollUrl: null };
let ws = null;
let opened = false;
let finished = false; // the call is over for this page (whoever ended it)
let answerSent = false; // past this, the call can no longer be declined
let ringEnded = false; // declined here, or it stopped ringing: nothing may answer it now
let inCall = false; // answered: the meters, keypad and Hang up show instead of the ring
let ctx = null;
let mic = null;
let capture = null;
let playback = null;
let streamSid = null;
let accountSid = null;
let callSid = null;
let seq = 0;
let chunk = 0;
let t0 = 0;
let markIds = 0;
const pendingMarks = new Map(); // id -> name, in the order they came
let pollTimer = null;
let pollsAfterFinal = 0;
let pollFailures = 0; // in a row
let lost = false; // callagent stopped answering the page
let faultClose = null; // the close code of a stream closed for a fault, which the problem box says
let lastTranscriptKey = "";
let ringTimer = null;
let ringFailures = 0; // in a row
let ringUnsettled = 0; // views of a stopped link whose attempt had not ended yet
let micEnded = false; // the microphone's track ended (unplugged, permission taken back)
let answerClicked = false; // Answer was pressed: the page may answer the call from now on
let gaveUp = false; // left (pagehide), or hung up before it connected: nothing more may start
// This page's own id, sent with its answer: a hang-up of the page left
// before the answer's reply came names it (it has no session yet).
const PAGE_ID = randomHex(16);
const TITLE = document.title;

const FINAL = new Set(["completed", "busy", "no_answer", "failed", "canceled"]);
// Why a call ended (its record's endReason), as the page says it.
const END_REASON_TEXT = {
  completed: "the agent ended it",
  callee_hung_up: "hung up on this phone",
  hung_up_by_api: "hung up through callagent's API",
  max_duration: "its time was up: call.maxDurationSec",
  session_limit: "the model's session was at its end",
  callee_silent: "nobody spoke",
  model_error: "the model failed",
  no_stream: "its audio never connected",
  stream_error: "its audio stream failed",
  shutdown: "callagent was stopped",
};
const STATUS_TEXT = {
  queued: "Queued",
  dialing: "Ringing",
  in_progress: "In progress",
  completed: "Completed",
  busy: "Busy",
  no_answer: "No answer",
  failed: "Failed",
  canceled: "Canceled",
};

// Page state --------------------------------------------------------------------

function setState(state, banner) {
  stats.state = state;
  if (banner !== undefined) $("banner").textContent = banner;
  const live = state === "connected";
  // Answered and still connecting: Hang up gives up on it.
  $("hangup").disabled = !(live || (state === "answering" && inCall && !finished));
  for (const b of $("keypad").querySelectorAll("button")) b.disabled = !live;
  $("incall").hidden = !inCall;
  $("ring").hidden = inCall || stats.ring === null;
  if (state === "error" || state === "mic-denied" || (state === "mic-lost" && !inCall) || (state === "ended" && !inCall)) {
    $("ring-title").textContent = "Not answered";
  }
  renderRingButtons();
  document.title = state === "ringing" ? "Ringing · " + TITLE : TITLE;
  renderPill();
}

// Answer while it rings; Decline until the answer goes out (the microphone
// prompt included); neither once it was declined or stopped ringing.
function renderRingButtons() {
  const ringing = (stats.state === "ringing" || stats.state === "answering") && !answerSent && !finished;
  $("answer").disabled = !(ringing && stats.state === "ringing");
  $("decline").disabled = !ringing;
  $("ring").classList.toggle("ringing", ringing);
}

function showProblem(text) {
  const p = $("problem");
  p.textContent = text;
  p.hidden = false;
}

function noteError(text) {
  stats.errors.push(text);
  if (stats.errors.length > 50) stats.errors.shift();
}

function renderPill() {
  const pill = $("status");
  const st = stats.callStatus;
  let text;
  let cls = "";
  if (stats.state === "declined") {
    text = "Declined";
    cls = "bad";
  } else if (stats.state === "stopped" && !lost) {
    const r = stats.ring || {};
    text = r.link === "answered" ? "Answered elsewhere" : r.link === "declined" ? "Declined" : STATUS_TEXT[r.attemptStatus] || "Not ringing";
    cls = r.link === "answered" ? "ended" : "bad";
  } else if (stats.state === "opening") {
    text = "Opening";
  } else if (stats.state === "ringing" || stats.state === "answering") {
    text = answerSent ? "Answering" : "Ringing";
  } else if (lost && !(st && FINAL.has(st))) {
    text = "Disconnected";
    cls = "bad";
  } else if (stats.state === "error" || stats.state === "mic-denied" || (stats.state === "mic-lost" && !(st && FINAL.has(st)))) {
    text = st && FINAL.has(st) ? STATUS_TEXT[st] || st : stats.state === "mic-lost" ? "Microphone lost" : "Not connected";
    cls = "bad";
  } else if (st) {
    text = STATUS_TEXT[st] || st;
    cls = st === "in_progress" ? "live" : FINAL.has(st) ? (st === "completed" ? "ended" : "bad") : "";
  } else {
    text = stats.state === "connected" ? "Connected" : stats.state === "ended" ? "Ended" : "Answering";
  }
  pill.textContent = text;
  pill.className = "pill" + (cls ? " " + cls : "");
}

// Bytes -------------------------------------------------------------------------

function toBase64(bytes) {
  if (bytes.toBase64) return bytes.toBase64();
  let s = "";
  for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
  return btoa(s);
}

function fromBase64(text) {
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function randomHex(bytes) {
  const b = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

// Answering ---------------------------------------------------------------------

async function answer() {
  if (ringEnded) return false;
  answerSent = true;
  stopRingCheck();
  renderRingButtons();
  let res;
  try {
    res = await fetch("/mock/api/answer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ callId: call.id, token: call.token, page: PAGE_ID }),
    });
  } catch (e) {
    if (gaveUp) return false;
    fail(`Could not reach callagent at ${location.origin}: is it still running? (${e.message})`);
    return false;
  }
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  // Left or hung up meanwhile: that hang-up ends the call, answered or not.
  if (gaveUp) return false;
  if (!res.ok) {
    ringEnded = true; // refused: nothing of this page's answers it, nor has it to be hung up
    const msg = body && body.error && body.error.message;
    if (res.status === 403) {
      fail("This call link was already used or is not valid. Each link answers one call once: start a new call to get a new link.");
    } else if (res.status === 410 && body && body.error && body.error.code === "declined") {
      fail("This call was declined from this link, so it cannot be answered. Each link answers one call once: start a new call to get a new link.");
    } else if (res.status === 410) {
      fail("This call stopped ringing before it was answered: the link has expired. Start a new call to get a new link.");
    } else if (res.status === 409) {
      fail(`This call is no longer waiting to be answered${msg ? ` (${msg})` : ""}.`);
    } else {
      fail(`Could not answer the call: HTTP ${res.status}${msg ? `: ${msg}` : ""}.`);
    }
    return false;
  }
  call.session = body.session;
  stats.callStatus = null; // the ring's; the poll has the call's from now on
  call.streamUrl = streamUrlHere(body.streamUrl);
  call.parameters = body.parameters;
  call.pollUrl = body.pollUrl;
  return true;
}

// The stream goes to the server that served this page, as the page's own
// requests do: opened through a forwarded port (ssh -L 9000:127.0.0.1:4545)
// or a mapped one, callagent's own address is not the one that reaches it.
function streamUrlHere(given) {
  const u = new URL(given, location.href);
  u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  u.host = location.host;
  return u.href;
}

// POST /mock/api/decline of this ringing call, by its link's token: status
// "failed" (a page that failed), or none (Decline: busy). Keepalive: a page
// closed right after still declines.
function sendDecline(status) {
  return fetch("/mock/api/decline", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ callId: call.id, token: call.token, status }),
    keepalive: true,
  });
}

// Decline: as a phone's reject button, the attempt ends busy; callagent's
// retry policy decides whether it rings again (under a new link).
async function decline() {
  if (finished || answerSent) return;
  finished = true;
  ringEnded = true;
  stopRingCheck();
  renderRingButtons();
  releaseMicrophone();
  $("banner").textContent = "Declining the call…";
  let res;
  try {
    res = await sendDecline();
  } catch (e) {
    fail(`Could not reach callagent at ${location.origin}: is it still running? (${e.message})`, "The call could not be declined.");
    return;
  }
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  const msg = body && body.error && body.error.message;
  if (!res.ok) {
    let text;
    if (res.status === 403) {
      text = "This call link was already used or is not valid: there is nothing to decline.";
    } else if (res.status === 409) {
      text = `This call can no longer be declined${msg ? ` (${msg})` : ""}.`;
    } else if (res.status === 410) {
      text = `This call stopped ringing before it was declined${msg ? ` (${msg})` : ""}.`;
    } else {
      text = `Could not decline the call: HTTP ${res.status}${msg ? `: ${msg}` : ""}.`;
    }
    fail(text, "The call could not be declined.");
    return;
  }
  stats.callStatus = body.status;
  $("ring-title").textContent = "Declined";
  setState("declined", "You declined the call: callagent was told the line is busy.");
  const note = $("end-reason");
  if (body.nextAttemptAt) {
    note.textContent = nextLink(body);
  } else {
    note.textContent = `No retry is left for this call: it ended ${STATUS_TEXT[body.status] || body.status}.`;
  }
  note.hidden = false;
}

// The microphone and the audio, when the call was declined or stopped
// ringing while they were asked for (or could not be used).
function releaseMicrophone() {
  if (mic) for (const t of mic.getTracks()) t.stop();
  if (ctx && ctx.state !== "closed") ctx.close().catch(() => {});
}

function fail(text, banner) {
  noteError(text);
  showProblem(text);
  finished = true;
  setState("error", banner || "The call could not be answered.");
}

// POST /mock/api/hangup of this call, with fields (its session, or its
// link's token and this page's id). Keepalive: a page closed right after
// (the tab shut as the answer's reply came) still hangs up.
function sendHangup(fields) {
  return fetch("/mock/api/hangup", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ callId: call.id, ...fields }),
    keepalive: true,
  }).catch((e) => noteError("hangup: " + e.message));
}

// reason: "microphone_lost" (micLost), or none.
function postHangup(reason) {
  if (!call.session) return Promise.resolve();
  return sendHangup({ session: call.session, reason });
}

// Microphone and audio ------------------------------------------------------------

async function openMicrophone() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    micProblem(
      "mic-denied",
      "No microphone is available to this page: browsers only offer it on https or on localhost. Open the link on the machine running callagent (http://127.0.0.1:...).",
    );
    return false;
  }
  try {
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      video: false,
    });
    if (ringEnded) {
      releaseMicrophone();
      return false;
    }
    for (const t of mic.getAudioTracks()) t.addEventListener("ended", guarded(micLost));
    return true;
  } catch (e) {
    if (ringEnded) return false;
    const name = e && e.name;
    if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
      micProblem(
        "mic-denied",
        "Microphone access was refused, so the call was hung up. Allow the microphone for this page (the icon in the address bar) and place the call again: each link answers only once.",
      );
    } else if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError") {
      micProblem("mic-denied", "No microphone was found, so the call was hung up. Connect one and place the call again.");
    } else if (name === "NotReadableError" || name === "AbortError") {
      micProblem(
        "mic-denied",
        "The microphone could not be opened (another program may be using it), so the call was hung up. Free it and place the call again.",
      );
    } else {
      micProblem("mic-denied", `The microphone could not be opened (${name || "error"}: ${e && e.message}), so the call was hung up.`);
    }
    return false;
  }
}

function micProblem(state, text) {
  noteError(text);
  showProblem(text);
  finished = true;
  setState(state, "Call ended");
  postHangup();
}

// The stream's `stop` (the callee hung up), then its close (why: the close reason).
function stopStream(why) {
  seq++;
  send({ event: "stop", sequenceNumber: String(seq), streamSid, stop: { accountSid, callSid } });
  if (ws) ws.close(1000, why);
}

const MIC_LOST_TEXT =
  "The microphone stopped (unplugged, or its permission was taken back), so the call was hung up. Connect or allow it and place the call again.";

// The microphone's track ended. Connected: the page hangs up, telling
// callagent why before the stream's stop (that stop alone is a callee who
// hung up, without a why). Answered and still connecting: as Hang up.
// Before the answer, answerCall sees micEnded and answers to hang up, as
// for a refused microphone.
function micLost() {
  micEnded = true;
  if (finished || !inCall) return;
  finished = true;
  const connected = stats.state === "connected";
  noteError(MIC_LOST_TEXT);
  showProblem(MIC_LOST_TEXT);
  stopAudio(false);
  setState("mic-lost", "Call ended: the microphone stopped.");
  if (!connected) {
    stopStream("microphone lost");
    postHangup();
    return;
  }
  postHangup("microphone_lost").finally(() => run(stopStream, "microphone lost"));
}

// Rates whose polyphase filters the worklets can build (dsp.js): any usual one.
function rateWorks(rate) {
  try {
    new Resampler(rate, 8000, { passband: 3200, stopband: 4000 });
    new Resampler(8000, rate, { passband: 3400, stopband: 4600 });
    return true;
  } catch {
    return false;
  }
}

// In the Answer click: the context is made and resumed in a user gesture,
// which every browser's autoplay rules let play (made later, after the
// microphone prompt, Safari would hold it). Its worklets load meanwhile.
function prepareAudio() {
  ctx = new AudioContext({ latencyHint: "interactive" });
  if (!rateWorks(ctx.sampleRate)) {
    ctx.close().catch(() => {});
    ctx = new AudioContext({ latencyHint: "interactive", sampleRate: 48000 });
  }
  stats.sampleRate = ctx.sampleRate;
  ctx.resume().catch(() => {});
  const c = ctx;
  return c.audioWorklet
    .addModule("/mock/static/capture-worklet.js")
    .then(() => c.audioWorklet.addModule("/mock/static/playback-worklet.js"));
}

// Once the microphone is open: the worklets, wired to it and to the speaker.
async function startAudio(ready) {
  await ready;
  playback = new AudioWorkletNode(ctx, "mock-phone-playback", {
    numberOfInputs: 0,
    numberOfOutputs: 1,
    outputChannelCount: [1],
  });
  playback.port.onmessage = guarded((e) => onPlayback(e.data));
  playback.onprocessorerror = () => noteError("the playback worklet failed");
  playback.connect(ctx.destination);

  // No outputs: the node is pulled by the context on its own.
  capture = new AudioWorkletNode(ctx, "mock-phone-capture", {
    numberOfInputs: 1,
    numberOfOutputs: 0,
    channelCount: 1,
    channelCountMode: "explicit",
    channelInterpretation: "speakers",
  });
  capture.port.onmessage = guarded((e) => onFrame(e.data));
  capture.onprocessorerror = () => noteError("the capture worklet failed");
  ctx.createMediaStreamSource(mic).connect(capture);
}

// The context, made in the click, may take a moment to start (Firefox).
// One that does not start within 3 s is one the browser holds back: false.
function audioRunning() {
  if (ctx.state === "running") return Promise.resolve(true);
  return new Promise((resolve) => {
    const done = () => {
      ctx.removeEventListener("statechange", check);
      clearTimeout(timer);
      resolve(ctx.state === "running");
    };
    const check = () => {
      if (ctx.state === "running") done();
    };
    const timer = after(3000, done);
    ctx.addEventListener("statechange", check);
    ctx.resume().then(check, () => {});
  });
}

// The call is over here. drain: the far end ended it (the agent's goodbye
// is queued): what is queued plays out, up to 5 s, before the device is let
// go. Not when the page hangs up: a phone hung up is silent at once, and
// the agent's audio runs seconds ahead of what has played.
function stopAudio(drain) {
  if (mic) for (const t of mic.getTracks()) t.stop();
  if (capture) capture.port.postMessage({ type: "stop" });
  $("mic-level").style.width = "0";
  const started = performance.now();
  const check = () => {
    if (!ctx || ctx.state === "closed") return;
    if (!drain || stats.bufferedMs <= 0 || performance.now() - started > 5000) {
      if (playback) playback.port.postMessage({ type: "stop" });
      ctx.close().catch(() => {});
      $("agent-level").style.width = "0";
    } else {
      after(100, check);
    }
  };
  if (drain) after(100, check);
  else check();
}

// A level meter's width: 60 dB of range, full at 0 dBFS.
function meter(peak) {
  const db = peak > 0 ? 20 * Math.log10(peak) : -100;
  return `${Math.round(Math.max(0, Math.min(1, 1 + db / 60)) * 100)}%`;
}

// The stream ---------------------------------------------------------------------

function send(obj) {
  if (ws && ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify(obj));
    return true;
  }
  return false;
}

function connect() {
  streamSid = "MZ" + randomHex(16);
  accountSid = "ACmock" + randomHex(14);
  callSid = "CAmock" + randomHex(14);
  $("banner").textContent = "Connecting the audio…";
  try {
    ws = new WebSocket(call.streamUrl);
  } catch (e) {
    streamFailed(`Could not open the audio stream to ${call.streamUrl}: ${e.message}`);
    return;
  }
  ws.onopen = guarded(() => {
    opened = true;
    t0 = performance.now();
    send({ event: "connected", protocol: "Call", version: "1.0.0" });
    seq = 1;
    send({
      event: "start",
      sequenceNumber: "1",
      streamSid,
      start: {
        accountSid,
        streamSid,
        callSid,
        tracks: ["inbound"],
        mediaFormat: { encoding: "audio/x-mulaw", sampleRate: 8000, channels: 1 },
        customParameters: call.parameters,
      },
    });
    setState("connected", "Connected: talk to the agent.");
  });
  ws.onmessage = guarded((e) => onStreamMessage(e.data));
  ws.onerror = () => noteError("websocket error");
  ws.onclose = guarded(onStreamClosed);
}

function streamFailed(text) {
  noteError(text);
  showProblem(text);
  finished = true;
  stopAudio(false);
  setState("error", "The call could not be connected.");
  postHangup();
}

function onFrame(m) {
  if (m.type !== "frame") return;
  stats.micPeak = m.peak;
  $("mic-level").style.width = meter(m.peak);
  if (stats.state !== "connected") return;
  const bytes = new Uint8Array(m.bytes);
  seq++;
  chunk++;
  const ok = send({
    event: "media",
    sequenceNumber: String(seq),
    streamSid,
    media: {
      track: "inbound",
      chunk: String(chunk),
      timestamp: String(Math.round(performance.now() - t0)),
      payload: toBase64(bytes),
    },
  });
  if (ok) {
    stats.framesSent++;
    stats.bytesSent += bytes.length;
  }
}

function echoMark(name) {
  seq++;
  if (send({ event: "mark", sequenceNumber: String(seq), streamSid, mark: { name } })) stats.marksEchoed++;
}

function onStreamMessage(data) {
  if (typeof data !== "string") return;
  let m;
  try {
    m = JSON.parse(data);
  } catch {
    noteError("unreadable stream message");
    return;
  }
  if (m.event === "media") {
    const payload = m.media && m.media.payload;
    if (typeof payload !== "string") return;
    let bytes;
    try {
      bytes = fromBase64(payload);
    } catch {
      noteError("media payload is not base64");
      return;
    }
    stats.mediaReceived += bytes.length;
    playback.port.postMessage({ type: "media", bytes: bytes.buffer }, [bytes.buffer]);
  } else if (m.event === "mark") {
    const name = m.mark && m.mark.name;
    stats.marksReceived++;
    const id = ++markIds;
    pendingMarks.set(id, name);
    playback.port.postMessage({ type: "mark", id });
  } else if (m.event === "clear") {
    // As Twilio: stop now, and every mark still waiting comes back at once.
    stats.clears++;
    playback.port.postMessage({ type: "clear" });
    for (const name of pendingMarks.values()) echoMark(name);
    pendingMarks.clear();
  }
}

function onPlayback(m) {
  if (m.type === "marks") {
    for (const id of m.ids) {
      if (pendingMarks.has(id)) {
        const name = pendingMarks.get(id);
        pendingMarks.delete(id);
        echoMark(name);
      }
    }
  } else if (m.type === "stats") {
    stats.playedSamples = m.played;
    stats.playedFrames = Math.floor(m.played / 160);
    stats.droppedOnClear = m.dropped;
    stats.playedAtClear = m.playedAtClear;
    stats.lastPeak = m.peak;
    stats.starved = m.starved;
    stats.bufferedMs = m.buffered;
    $("agent-level").style.width = meter(m.peak);
  }
}

function onStreamClosed(e) {
  if (finished) return;
  finished = true;
  if (!opened) {
    streamFailed(`The audio stream to ${call.streamUrl} could not be opened.`);
    return;
  }
  stopAudio(true);
  if (e.code === 1000 || e.code === 1001 || e.code === 1005) {
    setState("ended", "Call ended");
  } else if (e.code === 1006) {
    // No close frame: the connection itself broke (callagent stopped or was killed).
    lostContact(`the audio stream broke off (1006)`);
  } else {
    const why = `The audio stream closed (${e.code}${e.reason ? ": " + e.reason : ""}).`;
    faultClose = e.code;
    noteError(why);
    showProblem(why);
    setState("ended", "Call ended");
    // Closed for a fault by callagent: the call is over here, as Twilio's
    // is once its stream ended, and callagent is told so at once (it waits
    // a while for the vendor's final status, then ends the call itself).
    postHangup();
  }
}

// Hang up (the button, while answered; window.mockPhone.hangup at any
// point). Once: a second press does nothing. Ringing, not answered: as
// Decline. Answer pressed and the answer's reply not in (the microphone
// prompt, the audio starting, the answer on its way): as leaving the page
// then, the microphone let go and the call hung up by its link's token and
// this page's id (callagent answers it to hang it up if it had not), and
// nothing connects after.
function hangUp() {
  if (finished) return;
  if (!inCall && !answerClicked) return stats.state === "ringing" ? decline() : undefined;
  if (!inCall) {
    gaveUp = true;
    ringEnded = true;
    finished = true;
    stopRingCheck();
    sendHangup({ token: call.token, page: PAGE_ID });
    releaseMicrophone();
    setState("ended", "Call ended: you hung up.");
    return;
  }
  finished = true;
  stopStream("hung up");
  stopAudio(false);
  setState("ended", "Call ended: you hung up.");
  postHangup();
}

function sendDigit(digit) {
  if (stats.state !== "connected") return;
  seq++;
  if (send({ event: "dtmf", sequenceNumber: String(seq), streamSid, dtmf: { track: "inbound_track", digit } })) {
    stats.dtmfSent++;
  }
}

// The call's view ------------------------------------------------------------------

function lostContact(why) {
  if (lost) return;
  lost = true;
  const text = `Lost the connection to callagent at ${location.origin}: ${why}. Is it still running? The call is over for this page; its record says how it ended (GET /v1/calls/${call.id}).`;
  noteError(text);
  showProblem(text);
  setState("ended", "Call ended");
}

async function poll() {
  pollTimer = null;
  try {
    const res = await fetch(call.pollUrl, { cache: "no-store" });
    pollFailures = 0;
    if (res.ok) {
      render(await res.json());
    } else if (res.status === 403 || res.status === 404) {
      noteError(`poll: HTTP ${res.status}`);
      return;
    }
  } catch (e) {
    noteError("poll: " + e.message);
    pollFailures++;
    // Once the call is over here: three in a row (1.5 s), or one after the
    // stream broke off, and callagent is gone; nothing more will come.
    if (finished && (lost || pollFailures >= 3)) {
      lostContact("it does not answer");
      return;
    }
  }
  const st = stats.callStatus;
  if (st && FINAL.has(st)) {
    pollsAfterFinal++;
    if (pollsAfterFinal > 6) return; // the report comes with the final status; a few more to be sure
  }
  pollTimer = after(500, poll);
}

function render(v) {
  stats.callStatus = v.status;
  renderPill();
  renderTranscript(v.transcript || []);
  if (v.report) renderReport(v.report);
  const endNote = $("end-reason");
  if (FINAL.has(v.status)) {
    const parts = [`The call ended: ${STATUS_TEXT[v.status] || v.status}`];
    if (v.endReason) parts.push(`(${END_REASON_TEXT[v.endReason] || String(v.endReason).replace(/_/g, " ")})`);
    // Why, in callagent's words (a model that refused the key, a stream
    // that never came, a model error in a call that went on): what the
    // call's record says, not only in the log, whatever the status. Not
    // when its problem box says it already: the page's own why (the
    // microphone lost), or the close of a stream closed for a fault (its
    // code and reason; the end reason above stays).
    const err = typeof v.lastError === "string" ? v.lastError : "";
    const saidClose =
      faultClose !== null &&
      err.startsWith("media stream closed:") &&
      (err.includes(`(${faultClose}:`) || err.includes(`(${faultClose})`));
    const why = err && !((v.lastErrorIsPages || saidClose) && !$("problem").hidden) ? ` callagent says: ${err}` : "";
    endNote.textContent = parts.join(" ") + "." + why;
    endNote.hidden = false;
    if (stats.state === "connected") {
      // The engine ended it; the stream closes next.
      $("banner").textContent = "Call ended";
    } else if (stats.state === "answering" && inCall && !finished) {
      // Answered, and over before its stream opened (callagent waits 15 s
      // for it): nothing will connect now.
      finished = true;
      if (ws) ws.close(1000, "call ended");
      stopAudio(false);
      setState("error", "The call ended before its audio connected.");
    }
  }
  $("diag").textContent = JSON.stringify({ ...stats, lastError: v.lastError || undefined }, null, 1);
}

function renderTranscript(lines) {
  const key = lines.map((l) => `${l.role}:${l.text}:${l.interrupted ? 1 : 0}`).join("\n");
  if (key === lastTranscriptKey) return;
  lastTranscriptKey = key;
  const ol = $("transcript");
  ol.textContent = "";
  for (const l of lines) {
    const li = document.createElement("li");
    li.className = l.role === "agent" ? "agent" : "callee";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = l.role === "agent" ? "Agent" : "You";
    li.append(who, document.createTextNode(l.text || ""));
    if (l.interrupted) {
      const cut = document.createElement("span");
      cut.className = "cut";
      cut.textContent = " (interrupted)";
      li.append(cut);
    }
    ol.append(li);
  }
  $("transcript-empty").hidden = lines.length > 0;
  ol.lastElementChild && ol.lastElementChild.scrollIntoView({ block: "nearest" });
}

function renderReport(r) {
  $("report").hidden = false;
  $("report-summary").textContent = r.summary || "(no summary)";
  const outcome = $("report-outcome");
  outcome.textContent = String(r.outcome || "unknown").replace(/_/g, " ");
  outcome.className = "outcome " + (r.outcome || "unknown");
  const next = Array.isArray(r.nextSteps) ? r.nextSteps : [];
  const ul = $("report-next");
  ul.textContent = "";
  for (const s of next) {
    const li = document.createElement("li");
    li.textContent = s;
    ul.append(li);
  }
  $("report-next-block").hidden = next.length === 0;
  const data = r.data && typeof r.data === "object" ? Object.entries(r.data) : [];
  const dl = $("report-data");
  dl.textContent = "";
  for (const [k, val] of data) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = typeof val === "string" ? val : JSON.stringify(val);
    dl.append(dt, dd);
  }
  $("report-data-block").hidden = data.length === 0;
}

// The ring ----------------------------------------------------------------------------

function ringUrl() {
  return `/mock/api/ring/${encodeURIComponent(call.id)}?t=${encodeURIComponent(call.token)}`;
}

function stopRingCheck() {
  if (ringTimer) clearTimeout(ringTimer);
  ringTimer = null;
}

// GET the link's view: at once when the page opens, then every 500 ms while
// it rings (and while the microphone prompt is open, until the answer).
async function ringCheck() {
  ringTimer = null;
  if (answerSent || finished) return;
  let res;
  let body = null;
  try {
    res = await fetch(ringUrl(), { cache: "no-store" });
    body = await res.json().catch(() => null);
  } catch (e) {
    if (answerSent || finished) return;
    if (stats.state === "opening") {
      fail(`Could not reach callagent at ${location.origin}: is it still running? (${e.message})`);
      return;
    }
    noteError("ring: " + e.message);
    // Three in a row (1.5 s): callagent is gone, and the call with it.
    if (++ringFailures >= 3) {
      ringEnded = true;
      finished = true;
      releaseMicrophone();
      lostContact("it does not answer");
      return;
    }
    ringTimer = after(500, ringCheck);
    return;
  }
  ringFailures = 0;
  if (answerSent || finished) return; // answered or declined meanwhile: that request says how it went
  if (!res.ok || !body || typeof body.link !== "string") {
    const msg = body && body.error && body.error.message;
    if (stats.state === "opening" || res.status === 403) {
      if (res.status === 403) {
        fail("This call link was already used or is not valid. Each link answers one call once: start a new call to get a new link.");
      } else {
        fail(`Could not open the call: HTTP ${res.status}${msg ? `: ${msg}` : ""}.`);
      }
      return;
    }
    noteError(`ring: HTTP ${res.status}`);
    ringTimer = after(500, ringCheck);
    return;
  }
  if (stats.state === "opening") {
    // Opened after it stopped ringing: the link can do nothing more. What
    // became of the call: over, going on elsewhere, or ringing again.
    if (body.link !== "ringing") {
      stats.ring = body;
      stats.callStatus = body.status;
    }
    const over = FINAL.has(body.status);
    if (body.link === "answered") {
      fail(
        over
          ? `This call link was already used: the call was answered from it, and it is over (${STATUS_TEXT[body.status] || body.status}). Each link answers one call once: start a new call to get a new link.`
          : "This call link was already used: the call was answered from it, in another window or tab (or on this page before it was reloaded or left, which hangs the call up). Each link answers one call once.",
      );
    } else if (body.link === "declined") {
      fail(`This call was declined from this link, so it cannot be answered: each link answers one call once. ${nextLink(body)}`);
    } else if (body.link !== "ringing") {
      fail(`This call stopped ringing before it was answered: the link has expired.${saysWhy(body)} ${nextLink(body)}`);
    } else {
      showRing(body);
      ringTimer = after(500, ringCheck);
    }
    return;
  }
  if (body.link === "ringing") {
    stats.ring = body;
    ringTimer = after(500, ringCheck);
  } else if (body.link === "expired" && body.attemptStatus === "dialing" && ringUnsettled++ < 4) {
    // The link stopped a moment before its attempt's end was recorded: how it ended comes next.
    ringTimer = after(100, ringCheck);
  } else {
    stoppedRinging(body);
  }
}

// Where a link that can do nothing more sends the page: the call's next
// attempt rings under a link of its own (the call's hint has it), or a new
// call is needed.
// Why a call that stopped ringing is over, in callagent's words (its model
// refused the session while it rang, say), or "".
function saysWhy(v) {
  return typeof v.lastError === "string" && v.lastError ? ` callagent says: ${v.lastError}` : "";
}

function nextLink(v) {
  const hint = `the call's hint (GET /v1/calls/${v.callId}) has it.`;
  if (v.status === "queued") {
    const at = v.nextAttemptAt ? new Date(v.nextAttemptAt) : null;
    const when = !at ? "" : isNaN(at) ? ` at ${v.nextAttemptAt}` : ` at ${at.toLocaleTimeString()}`;
    return `callagent calls again${when} (attempt ${v.attempt + 1}), under a new link: ${hint}`;
  }
  if (v.status === "dialing" || v.status === "in_progress") {
    return `callagent has called again since (attempt ${v.attempt + 1} or later), under a new link: ${hint}`;
  }
  return "Start a new call to get a new link.";
}

// Who calls whom, from the link's view (the page shows only text it was given).
function showRing(v) {
  stats.ring = v;
  stats.callStatus = v.status;
  $("ring-from").textContent = v.callerName ? `callagent, on behalf of ${v.callerName}` : "callagent";
  const to = v.to || "an unknown number";
  $("ring-to").textContent = v.calleeName ? `${v.calleeName} (${to})` : to;
  $("ring-call").textContent = v.attempt > 1 ? `${v.callId}, attempt ${v.attempt}` : v.callId;
  $("ring-title").textContent = "Incoming call";
  setState("ringing", "Incoming call: answer to talk to the agent, or decline it.");
  $("answer").focus();
}

// The call stopped ringing while the page showed it: the page says why and
// what comes next; nothing can answer or decline it from here any more.
function stoppedRinging(v) {
  finished = true;
  ringEnded = true;
  stopRingCheck();
  releaseMicrophone();
  stats.ring = v;
  stats.callStatus = v.status;
  let title;
  let banner;
  if (v.link === "answered") {
    title = "Answered elsewhere";
    banner = "The call was answered elsewhere: this link was opened in another window or tab, which took it.";
  } else if (v.link === "declined") {
    title = "Declined elsewhere";
    banner = "The call was declined elsewhere: this link was opened in another window or tab, which declined it.";
  } else if (v.attemptStatus === "no_answer") {
    title = "Missed call";
    banner = "Missed call: it stopped ringing before it was answered (call.ringTimeoutSec).";
  } else if (v.attemptStatus === "canceled") {
    title = "Call canceled";
    banner = "The call stopped ringing: callagent hung up before it was answered.";
  } else {
    title = "Stopped ringing";
    const st = v.attemptStatus && v.attemptStatus !== "dialing" ? STATUS_TEXT[v.attemptStatus] || v.attemptStatus : "";
    banner = `The call stopped ringing${st ? ` (${st})` : ""}.`;
  }
  $("ring-title").textContent = title;
  setState("stopped", banner);
  const note = $("end-reason");
  if (FINAL.has(v.status)) {
    note.textContent = `The call ended: ${STATUS_TEXT[v.status] || v.status}.${saysWhy(v)}`;
    note.hidden = false;
  } else if (v.link !== "answered" && (v.status === "queued" || FINAL.has(v.attemptStatus))) {
    // This attempt is over and the call is not: it rings again (or rings
    // already, a retry with no delay), under a new link.
    note.textContent = nextLink(v);
    note.hidden = false;
  }
}

// Answer: the audio context in the click itself, then the microphone, then
// the answer. callagent waits 15 s for an answered call's stream, and a
// person may take longer than that over the microphone prompt. A page that
// cannot talk answers and hangs up at once, so that the call ends now
// instead of ringing on.
async function answerCall() {
  if (stats.state !== "ringing" || finished) return;
  answerClicked = true;
  let ready;
  try {
    ready = prepareAudio();
  } catch (e) {
    ready = Promise.reject(e);
  }
  ready.catch(() => {}); // awaited below, unless the call is declined first
  setState("answering", "Allow the microphone to answer the call, or decline it.");
  if (!(await openMicrophone())) {
    if (ringEnded) return;
    releaseMicrophone();
    await answerToEnd();
    return;
  }
  try {
    await startAudio(ready);
  } catch (e) {
    releaseMicrophone();
    if (ringEnded) return;
    fail(`The audio could not start in this browser: ${e.message}. The call was hung up.`, "Call ended");
    await answerToEnd();
    return;
  }
  if (ringEnded) return releaseMicrophone();
  if (!(await audioRunning())) {
    releaseMicrophone();
    if (ringEnded) return;
    fail("The browser did not start the audio for this page, so the call was hung up. Allow sound for this site and place the call again.", "Call ended");
    await answerToEnd();
    return;
  }
  if (ringEnded) return releaseMicrophone();
  if (micEnded) {
    // Lost while the audio started: nothing to talk with.
    releaseMicrophone();
    micProblem("mic-lost", MIC_LOST_TEXT);
    await answerToEnd();
    return;
  }
  setState("answering", "Answering the call…");
  if (!(await answer())) {
    releaseMicrophone();
    return;
  }
  inCall = true;
  setState("answering");
  run(poll);
  if (micEnded) {
    // Lost during the answer's request.
    micLost();
    return;
  }
  connect();
}

// The call answered and hung up at once: it ends now, as it would for a
// phone picked up and put down.
async function answerToEnd() {
  if (await answer()) {
    run(poll); // shows the call end
    postHangup();
  }
}

// Start ---------------------------------------------------------------------------

async function main() {
  setState("opening", "Opening the call link…");
  $("hangup").onclick = guarded(() => hangUp());
  $("answer").onclick = guarded(() => answerCall());
  $("decline").onclick = guarded(() => decline());
  for (const b of $("keypad").querySelectorAll("button")) b.onclick = guarded(() => sendDigit(b.dataset.digit));
  document.addEventListener(
    "keydown",
    guarded((e) => {
      // A key held down is one key, as on a phone: not one per keyboard repeat.
      if (/^[0-9*#]$/.test(e.key) && !e.repeat && !e.ctrlKey && !e.metaKey && !e.altKey) sendDigit(e.key);
    }),
  );
  // Back from the back/forward cache: the page as it was left (a call it
  // hung up then, a ring that may have stopped since); loaded again, it
  // asks its link's view afresh.
  window.addEventListener("pageshow", (e) => {
    if (e.persisted) location.reload();
  });
  window.addEventListener("pagehide", guarded(leavePage));

  const m = location.pathname.match(/^\/mock\/call\/([^/]+)\/?$/);
  call.id = m ? decodeURIComponent(m[1]) : null;
  call.token = new URLSearchParams(location.search).get("t");
  if (!call.id || !call.token) {
    fail("This link is incomplete: it needs the call id and the ?t= token. Open the whole link callagent printed.");
    return;
  }
  await ringCheck();
}

// The page is left (closed, navigated away, or kept in the back/forward
// cache): the microphone is let go whatever the page was doing (a grant
// that comes later is let go as it comes: ringEnded), and a call it
// answered, or may be answering, is hung up. Answered: with its session.
// Answer pressed and the answer's reply not in (the microphone prompt, the
// audio starting, the answer on its way): by the link's token and this
// page's id, which callagent answers and hangs up if it was not answered
// yet, as a refused microphone's call. Only ringing: it rings on, and the
// page is left as it was (it has no microphone yet).
function leavePage() {
  const answering = answerClicked && !call.session && !ringEnded;
  const wasFinished = finished;
  if (!wasFinished && !call.session && !answering) return;
  gaveUp = true;
  ringEnded = true;
  finished = true;
  stopRingCheck();
  // The server first (a fault in what follows must not keep the call on).
  if (call.session && !wasFinished) {
    postHangup();
  } else if (answering) {
    sendHangup({ token: call.token, page: PAGE_ID });
  }
  if (call.session && !wasFinished) stopStream("page closed");
  stopAudio(false);
  if (!wasFinished) setState("ended", "Call ended: you left the page.");
}

// A fault of the page itself (a bug, a browser without something it uses),
// wherever it comes from (main, a button, a timer's step, an event: run):
// it says so, and ends on the server what it had of the call, so that the
// call's status agrees with the page. Answered: hung up with its session.
// The answer sent and its reply not in: by its link's token and this page's
// id, as when it is left. Ringing (or opening), Answer pressed or not, and
// the answer not sent (the microphone prompt, the audio starting): declined
// with status "failed" (Decline's request): nobody can answer on this page,
// and it must not ring on until the ring time, nor be answered only to be
// hung up. The server first, the page's own display last: a fault that
// recurs there (what failed, failing again) must not keep the call ringing
// on, and is only noted. Once: a later fault is only noted.
let faulted = false;
function pageFailed(e) {
  noteError(String(e && e.stack ? e.stack : e));
  if (faulted) return;
  faulted = true;
  const answering = answerSent && !call.session && !ringEnded;
  const ringing = !answerSent && !ringEnded && call.id && call.token;
  ringEnded = true;
  finished = true;
  stopRingCheck();
  if (call.session) {
    postHangup();
  } else if (answering) {
    sendHangup({ token: call.token, page: PAGE_ID });
  } else if (ringing) {
    sendDecline("failed").catch((err) => noteError("decline: " + err.message));
  }
  try {
    releaseMicrophone();
    fail(`Something went wrong on this page: ${e && e.message ? e.message : e}`, "Call ended");
  } catch (again) {
    noteError(String(again && again.stack ? again.stack : again));
  }
}

// Runs step(...args), a step of the page that nothing awaits (a timer's, a
// button's, an event's; async or not): its fault, thrown or a rejection,
// goes to pageFailed, as main()'s does, rather than to the console as an
// error that ends nothing (the call ringing on to the ring time).
function run(step, ...args) {
  try {
    const p = step(...args);
    if (p && typeof p.then === "function") p.then(undefined, pageFailed);
  } catch (e) {
    pageFailed(e);
  }
}

// step as a handler (an event's, a button's), run as run() does.
function guarded(step) {
  return (...args) => run(step, ...args);
}

// setTimeout of step, run as run() does.
function after(ms, step) {
  return setTimeout(run, ms, step);
}

main().catch(pageFailed);
