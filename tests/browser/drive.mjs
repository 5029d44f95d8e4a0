// drive.mjs: opens the mock phone page in a real, headless Chromium and
// reports what happened, for tests/test_mock_browser.lua.
//
//   node tests/browser/drive.mjs URL WAV SCREENSHOT [options]
//     URL         the hint of a mock call (http://127.0.0.1:PORT/mock/call/ID?t=...)
//     WAV         16-bit PCM WAV the fake microphone plays (looped by Chromium)
//     SCREENSHOT  where the PNG of the page at the end goes
//
// The page rings first: once it shows Answer and Decline, what it shows is
// recorded in .ring {title, from, to, call, banner, status, focused (the id
// of the focused element), answer, decline (each {enabled}), micRequests
// (getUserMedia calls so far), micPermission (the Permissions API's state)},
// and Answer is clicked (found by its accessible name), unless an option
// below says otherwise. Chromium runs with its usual autoplay rules: the
// click is what lets the page's audio play. The microphone permission is
// granted beforehand (a browser that remembers it), and .micRequests at the
// end counts the page's getUserMedia calls.
//
//   --deny-mic          the microphone is refused: no fake-UI auto-accept,
//                       --deny-permission-prompts, and the context grants nothing
//   --dial              URL is the dial form (/mock/): press its Call, which
//                       opens the new call's page; .callId is that call's
//   --answer-key        answer with the Enter key (on the focused element)
//                       instead of a click
//   --ring-shot=PATH    a screenshot of the ringing page, before answering
//   --press=DIGITS      once connected, click these keypad keys
//   --hold=KEY          once connected (after --press), hold KEY down as a
//                       person does: one keydown and then the keyboard's
//                       repeats (repeat: true), then its keyup
//   --hangup-after=MS   click Hang up MS after the stream connected; .hungUpMs
//                       is when the click was (in ms, as the samples' first
//                       field)
//   --watch-after=MS    with --hangup-after: the end not before MS past the
//                       click (what the page still plays)
//   --live-shot=PATH    a screenshot 2 s after the stream connected
//   --oversize-after=MS MS after the stream connected, send on the page's
//                       stream a 300 KiB text message (over a callagent
//                       app's max_ws_message: callagent closes it, 1009)
//   --reload-after=MS   reload the page MS after the stream connected, and
//                       end once the reloaded page left "opening": .reload
//                       {state, problem, status, stats (the page's before)}
//   --mic-lost-after=MS MS after the stream connected, the page's microphone
//                       is lost: its tracks are stopped and each gets the
//                       `ended` an unplugged device (or a revoked permission)
//                       fires; .micLostMs is when (as --hangup-after's); the
//                       end as for --no-report
//   --mic-lost-on-grant the microphone is lost as soon as it is granted, before
//                       the page answered (the same way as --mic-lost-after);
//                       the end as for --no-report
//   --cache-after=MS    MS after the stream connected, the page goes into the
//                       back/forward cache and comes back: the window gets a
//                       pagehide and then a pageshow, each persisted, as
//                       Firefox and Safari do (Chromium keeps a page that used
//                       the microphone out of its cache: notRestoredReasons
//                       "mediastream", so it is played here). .back {reloaded
//                       (the page loaded again within 5 s), micLiveInCache (a
//                       microphone track still live between the two), state,
//                       problem, status}; the end once it is past "opening"
//   --leave=WHEN        the page is left (a pagehide, persisted, and no
//                       pageshow: the page is watched on, as a browser that
//                       froze it late would let it run) after Answer: WHEN
//                       "prompt", while the microphone prompt is open (the
//                       grant comes just after); "granted", as soon as the
//                       page has the microphone, before its answer's reply;
//                       "answer", once callagent answered the page's answer,
//                       before the page reads its reply; "connecting",
//                       once the page made its stream's WebSocket, before
//                       it opened.
//                       The end once the call is over at callagent (its
//                       link's view) and the page has no live microphone
//                       track (the one sample after): .left {micLive,
//                       state, framesSent}
//   --close=WHEN        as --leave, but the tab is closed then (page.close():
//                       a real pagehide, and the page is gone); the end once
//                       it closed: .left {closed: true}
//   --reopen            at the end, open URL again (a used link) and record
//                       what the page says in .reopen {state, problem}
//   --mic-delay=MS      the microphone is granted MS after the page asks (a person
//                       reading the prompt)
//   --decline           click Decline (not Answer) while the page rings; the end
//                       is then the page's "declined" (or another end of the
//                       ring), whatever the call's status
//   --api-hangup        neither button: once it rings, hang the call up through
//                       callagent's API (POST /v1/calls/ID/hangup); the end is
//                       the page leaving "ringing"
//   --answer-elsewhere  neither button: once it rings, answer it as another tab
//                       with the same link would (POST /mock/api/answer); the
//                       end as for --api-hangup
//   --ring-fault        the page fails as it shows the ring (its document.title
//                       set to "Ringing ..." throws, a bug of the page's own,
//                       and every title set after that throws too, as a
//                       feature the browser lacks stays missing); neither
//                       button; the end is the page leaving "opening" /
//                       "ringing"
//   --ring-check-fault  the page fails in a later check of its ring: from the
//                       second ring view on, the reply's link field throws as
//                       the page reads it (a bug of the page's own, after it
//                       showed the ring); neither button; the end as for
//                       --ring-fault
//   --answer-fault      Answer is clicked, and the page fails once it has the
//                       microphone, before its answer goes out: a
//                       document.title set while it answers with the
//                       microphone granted throws (a bug of the page's own);
//                       the end is the page leaving "answering", whatever
//                       the call's status
//   --let-ring          neither button: let it ring until it stops (the ring
//                       time); the end as for --api-hangup
//   --forward           open URL through a TCP forward on another port (as
//                       ssh -L does), which counts the connections that upgrade
//                       to /voice/stream: .forward {streams}
//   --hold-stream       with --forward: the page's media stream connection
//                       gets no answer, ever (.forward {streams, held})
//   --cut-after=MS      with --forward: MS after the stream connected, close
//                       the forward and all its connections (callagent gone,
//                       as the page sees it), then watch the page until it
//                       ended and 1 s more (at least 1.5 s after the cut), and
//                       1.5 s after that: .afterCut {errorsSoon, errorsLater}
//   --csp-probe         once the page loaded, add an inline script to it, which
//                       its Content-Security-Policy must block:
//                       .cspProbe {ran, reported (violations it caused)}
//   --hook-hangup=WHEN  window.mockPhone.hangup() twice (a double press): WHEN
//                       "connected", 300 ms after the stream connected
//                       (.hook {threw: what the calls threw, or false});
//                       "answer", once callagent answered the page's answer,
//                       before the page read its reply; the end is then the
//                       page over with the reply read (.hook {sockets: the
//                       WebSockets the page made})
//   --close-fault       the page's WebSocket close() throws (a bug of the page's own)
//   --no-report         the end does not wait for a report (a call that fails)
//   --timeout=MS        how long to wait for the end (default 30000)
//   --chromium=PATH     the browser (default /usr/bin/chromium)
//
// The end: the page's state is no longer "opening", "ringing", "answering"
// or "connected", the call status it polls is final, and - unless --deny-mic
// or --hangup-after - the report is on the page. window.mockPhone.stats is
// sampled every 100 ms meanwhile. Then the screenshot is saved and one JSON
// line printed:
//   {ok, elapsedMs, stats, samples: [[ms, playedSamples, clears, lastPeak,
//    mediaReceived, framesSent, droppedOnClear, marksEchoed]...], ring,
//    banner, problem, status, ringTitle, reportText, transcriptText, endText,
//    buttons {answer, decline: {visible, enabled}}, micRequests, micLive (a
//    microphone track still live at the end), console, reopen}
// .hangupWhileAnswering is Hang up's {visible, enabled} at the last sample
// of the state "answering" (the microphone prompt, then the stream's connect).
// .documents lists the pages loaded in the tab, each {path, csp (its
// Content-Security-Policy header, or null)}; .cspViolations the page's
// Content-Security-Policy violations (securitypolicyviolation events and the
// browser's console reports of them): any is a failure.
// .hangupRequests counts the page's POST /mock/api/hangup requests.
// ok is false (exit status 1) with .error when something failed on the way.
//
//   node tests/browser/drive.mjs --serve
// runs the runs that come on stdin, each in a browser context of its own,
// in browsers started once (serve(), below): test_mock_browser.lua's way.
import { chromium } from "playwright-core";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";

const FINAL = ["completed", "busy", "no_answer", "failed", "canceled"];

// A run's arguments: {opts, positional}.
function parse(argv) {
  const positional = [];
  const opts = { timeout: 30000, chromium: "/usr/bin/chromium", denyMic: false, press: "", hangupAfter: null };
  for (const a of argv) {
    if (a === "--deny-mic") opts.denyMic = true;
    else if (a === "--reopen") opts.reopen = true;
    else if (a === "--decline") opts.decline = true;
    else if (a === "--api-hangup") opts.apiHangup = true;
    else if (a === "--answer-elsewhere") opts.answerElsewhere = true;
    else if (a === "--let-ring") opts.letRing = true;
    else if (a === "--ring-fault") opts.ringFault = true;
    else if (a === "--ring-check-fault") opts.ringCheckFault = true;
    else if (a === "--answer-fault") opts.answerFault = true;
    else if (a === "--answer-key") opts.answerKey = true;
    else if (a === "--dial") opts.dial = true;
    else if (a === "--no-report") opts.noReport = true;
    else if (a.startsWith("--ring-shot=")) opts.ringShot = a.slice(12);
    else if (a.startsWith("--press=")) opts.press = a.slice(8);
    else if (a.startsWith("--hangup-after=")) opts.hangupAfter = Number(a.slice(15));
    else if (a.startsWith("--watch-after=")) opts.watchAfter = Number(a.slice(14));
    else if (a.startsWith("--oversize-after=")) opts.oversizeAfter = Number(a.slice(17));
    else if (a.startsWith("--hold=")) opts.hold = a.slice(7);
    else if (a.startsWith("--reload-after=")) opts.reloadAfter = Number(a.slice(15));
    else if (a.startsWith("--mic-lost-after=")) opts.micLostAfter = Number(a.slice(17));
    else if (a.startsWith("--cache-after=")) opts.cacheAfter = Number(a.slice(14));
    else if (a === "--mic-lost-on-grant") opts.micLostOnGrant = true;
    else if (a.startsWith("--leave=")) opts.leave = a.slice(8);
    else if (a.startsWith("--close=")) {
      opts.leave = a.slice(8);
      opts.closeTab = true;
    }
    else if (a.startsWith("--live-shot=")) opts.liveShot = a.slice(12);
    else if (a.startsWith("--timeout=")) opts.timeout = Number(a.slice(10));
    else if (a.startsWith("--mic-delay=")) opts.micDelay = Number(a.slice(12));
    else if (a.startsWith("--chromium=")) opts.chromium = a.slice(11);
    else if (a === "--forward") opts.forward = true;
    else if (a === "--hold-stream") opts.holdStream = true;
    else if (a === "--csp-probe") opts.cspProbe = true;
    else if (a.startsWith("--cut-after=")) opts.cutAfter = Number(a.slice(12));
    else if (a.startsWith("--hook-hangup=")) opts.hookHangup = a.slice(14);
    else if (a === "--close-fault") opts.closeFault = true;
    else positional.push(a);
  }
  return { opts, positional };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A TCP forward from a port of its own to the URL's (ssh -L, in small).
// holdStreams: a connection that asks for /voice/stream gets no answer, ever
// (it is kept open, and goes nowhere).
async function startForward(target, holdStreams) {
  const t = new URL(target);
  const sockets = new Set();
  const stats = { streams: 0, held: 0 };
  const server = net.createServer((c) => {
    sockets.add(c);
    c.on("error", () => c.destroy());
    c.once("data", (d) => {
      if (/^GET \/voice\/stream[ ?]/.test(d.toString("latin1"))) {
        stats.streams++;
        if (holdStreams) {
          stats.held++;
          c.on("close", () => sockets.delete(c));
          return;
        }
      }
      const up = net.connect(Number(t.port), t.hostname);
      sockets.add(up);
      up.write(d);
      c.pipe(up);
      up.pipe(c);
      const end = () => {
        c.destroy();
        up.destroy();
        sockets.delete(c);
        sockets.delete(up);
      };
      c.on("close", end);
      up.on("error", end).on("close", end);
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    stats,
    url: target.replace(/^http:\/\/[^/]+/, `http://127.0.0.1:${server.address().port}`),
    cut() {
      server.close();
      for (const s of sockets) s.destroy();
    },
  };
}

// A button by its accessible name, as a screen reader finds it.
const button = (page, name) => page.getByRole("button", { name, exact: true });

async function buttonState(page, name) {
  const b = button(page, name);
  const visible = (await b.count()) === 1 && (await b.isVisible());
  return { visible, enabled: visible && (await b.isEnabled()) };
}

// The page's state once it is past "opening" (a freshly loaded page asks
// its link's view first), or as it is after 5 s.
async function settledState(page) {
  const until = Date.now() + 5000;
  let st = null;
  while (Date.now() < until) {
    st = await page.evaluate(() => window.mockPhone && window.mockPhone.stats.state);
    if (st && st !== "opening") break;
    await sleep(50);
  }
  return st;
}

async function visibleText(page, id) {
  return page.evaluate((i) => {
    const el = document.getElementById(i);
    return el && !el.hidden ? el.innerText.trim() : "";
  }, id);
}

// What a page loaded again shows: its settled state, problem and status.
async function shownAgain(page) {
  return {
    state: await settledState(page),
    problem: await visibleText(page, "problem"),
    status: await visibleText(page, "status"),
  };
}

// The browsers, launched once and kept for every run: one per way its
// microphone is set up (the WAV it plays, by content; allowed, or refused),
// each run in a context of its own. Their WAVs are copies in a folder of
// this process, removed with the browsers.
const browsers = new Map();
let wavDir = null;
async function browserFor(opts, wav) {
  if (!fs.existsSync(opts.chromium)) {
    throw new Error(`${opts.chromium} is missing: install Debian's chromium (apt-get install -y chromium)`);
  }
  if (!fs.existsSync(wav)) throw new Error(`no such WAV file: ${wav}`);
  const data = fs.readFileSync(wav);
  const sum = crypto.createHash("sha256").update(data).digest("hex").slice(0, 16);
  const key = `${opts.chromium} ${sum} ${opts.denyMic ? "deny" : "allow"}`;
  if (!browsers.has(key)) browsers.set(key, launch(opts, data, sum));
  let browser;
  try {
    browser = await browsers.get(key);
  } catch (e) {
    browsers.delete(key);
    throw e;
  }
  if (browser.isConnected()) return browser;
  // It crashed (or was closed) since: a new one, for this run and the next.
  browsers.delete(key);
  return browserFor(opts, wav);
}

async function launch(opts, data, sum) {
  wavDir = wavDir || fs.mkdtempSync(path.join(os.tmpdir(), "callagent-drive-"));
  const wav = path.join(wavDir, `${sum}.wav`);
  fs.writeFileSync(wav, data);
  const args = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--use-fake-device-for-media-stream",
    `--use-file-for-fake-audio-capture=${wav}`,
  ];
  args.push(opts.denyMic ? "--deny-permission-prompts" : "--use-fake-ui-for-media-stream");
  return chromium.launch({ executablePath: opts.chromium, headless: true, args });
}

async function closeBrowsers() {
  for (const b of browsers.values()) await b.then((x) => x.close()).catch(() => {});
  browsers.clear();
  if (wavDir) fs.rmSync(wavDir, { recursive: true, force: true });
  wavDir = null;
}

// One run: argv as on the command line; its result (.ok, or .error).
// url "-": once its page is set up (the browser started, the context and
// the page made, before any URL), ready() is called, and the URL is what
// it returns (a promise): the call is placed then, so that its ring time
// starts with the page about to open it.
async function job(argv, ready) {
  const { opts, positional } = parse(argv);
  const out = { ok: false, console: [], documents: [], cspViolations: [] };
  const t0 = Date.now();
  try {
    await run(opts, out, positional, ready);
  } catch (e) {
    out.error = String(e && e.message ? e.message : e);
  }
  out.elapsedMs = Date.now() - t0;
  return out;
}

async function run(opts, out, positional, ready) {
  let [url, wav, shot] = positional;
  if (!url || !wav || !shot) throw new Error("usage: drive.mjs URL WAV SCREENSHOT [options]");
  const browser = await browserFor(opts, wav);
  let context;
  let forward = null;
  try {
    context = await browser.newContext({
      viewport: { width: 1100, height: 860 },
      permissions: opts.denyMic ? [] : ["microphone"],
    });
    const page = await context.newPage();
    page.on("console", (m) => {
      if (m.type() === "error" || m.type() === "warning") out.console.push(`${m.type()}: ${m.text()}`.slice(0, 300));
      if (/Content Security Policy/i.test(m.text())) out.cspViolations.push(`console: ${m.text()}`.slice(0, 300));
    });
    page.on("response", (r) => {
      if (r.request().resourceType() === "document" && r.frame() === page.mainFrame()) {
        out.documents.push({ path: new URL(r.url()).pathname, csp: r.headers()["content-security-policy"] || null });
      }
    });
    await page.exposeFunction("__cspViolation", (v) => out.cspViolations.push(`event: ${v}`.slice(0, 300)));
    await page.addInitScript(() => {
      document.addEventListener("securitypolicyviolation", (e) =>
        window.__cspViolation(`${e.effectiveDirective} blocked ${e.blockedURI || "(inline)"} at ${e.sourceFile}:${e.lineNumber}`),
      );
    });
    page.on("pageerror", (e) => out.console.push(`pageerror: ${e.message}`.slice(0, 300)));
    out.hangupRequests = 0;
    page.on("request", (r) => {
      if (new URL(r.url()).pathname === "/mock/api/hangup") out.hangupRequests++;
    });
    if (opts.closeFault) {
      // The page's stream fails as the page closes it (a bug of the page's own).
      await page.addInitScript(() => {
        WebSocket.prototype.close = () => {
          throw new Error("injected fault");
        };
      });
    }
    if (opts.hookHangup === "answer") {
      // Hung up twice through window.mockPhone.hangup once callagent
      // answered the page's answer, before the page read the reply;
      // __answerRead once the page read it.
      await page.addInitScript(() => {
        const f = window.fetch.bind(window);
        window.fetch = (u, o) =>
          String(u).endsWith("/mock/api/answer")
            ? f(u, o).then((res) => {
                window.mockPhone.hangup();
                window.mockPhone.hangup();
                const json = res.json.bind(res);
                res.json = () => json().finally(() => (window.__answerRead = true));
                return res;
              })
            : f(u, o);
      });
    }
    if (opts.oversizeAfter != null || opts.hookHangup) {
      // Keeps the page's WebSockets, to send on its stream.
      await page.addInitScript(() => {
        const WS = window.WebSocket;
        window.__sockets = [];
        window.WebSocket = class extends WS {
          constructor(...args) {
            super(...args);
            window.__sockets.push(this);
          }
        };
      });
    }
    if (opts.ringFault) {
      await page.addInitScript(() => {
        const d = Object.getOwnPropertyDescriptor(Document.prototype, "title");
        let broken = false;
        Object.defineProperty(Document.prototype, "title", {
          configurable: true,
          get() {
            return d.get.call(this);
          },
          set(v) {
            if (broken || String(v).startsWith("Ringing")) {
              broken = true;
              throw new Error("injected fault");
            }
            d.set.call(this, v);
          },
        });
      });
    }
    if (opts.ringCheckFault) {
      await page.addInitScript(() => {
        const json = Response.prototype.json;
        let views = 0;
        Response.prototype.json = function () {
          const got = json.call(this);
          if (!this.url.includes("/mock/api/ring/") || ++views < 2) return got;
          return got.then((v) =>
            Object.defineProperty(v, "link", {
              get() {
                throw new Error("injected fault");
              },
            }),
          );
        };
      });
    }
    if (opts.answerFault) {
      await page.addInitScript(() => {
        const d = Object.getOwnPropertyDescriptor(Document.prototype, "title");
        Object.defineProperty(Document.prototype, "title", {
          configurable: true,
          get() {
            return d.get.call(this);
          },
          set(v) {
            const p = window.mockPhone;
            if (p && p.stats.state === "answering" && (window.__micStreams || []).length) {
              throw new Error("injected fault");
            }
            d.set.call(this, v);
          },
        });
      });
    }
    // Counts the page's microphone requests; with --mic-delay, grants them late.
    let tabClosed = null; // --close: the tab's close, once asked
    if (opts.closeTab) {
      await page.exposeFunction("__closeTab", () => {
        tabClosed = tabClosed || page.close();
      });
    }
    await page.addInitScript(([ms, loseOnGrant, leave, closeTab]) => {
      const leavePage = () => {
        window.__leftAt = performance.now();
        if (closeTab) window.__closeTab();
        else window.dispatchEvent(new PageTransitionEvent("pagehide", { persisted: true }));
      };
      if (leave === "answer") {
        // The answer answered at callagent, its reply not yet read by the page.
        const f = window.fetch.bind(window);
        window.fetch = (u, o) =>
          String(u).endsWith("/mock/api/answer")
            ? f(u, o).then((res) => {
                leavePage();
                return res;
              })
            : f(u, o);
      }
      if (leave === "connecting") {
        // Its stream made, not open yet (the page's next task, as a person's close comes).
        const WS = window.WebSocket;
        window.WebSocket = class extends WS {
          constructor(...args) {
            super(...args);
            setTimeout(leavePage, 0);
          }
        };
      }
      window.__micRequests = 0;
      const md = navigator.mediaDevices;
      if (!md) return;
      const ask = md.getUserMedia.bind(md);
      md.getUserMedia = (c) => {
        window.__micRequests++;
        const got = ms ? new Promise((r) => setTimeout(r, ms)).then(() => ask(c)) : ask(c);
        return got.then((s) => {
          (window.__micStreams = window.__micStreams || []).push(s);
          if (leave === "prompt") leavePage(); // before the page has the grant
          if (leave === "granted") setTimeout(leavePage, 0); // once it has it
          if (loseOnGrant) {
            // Once the page has it (and listens to its tracks).
            setTimeout(() => {
              for (const t of s.getAudioTracks()) {
                t.stop();
                t.dispatchEvent(new Event("ended"));
              }
            }, 0);
          }
          return s;
        });
      };
    }, [opts.micDelay || 0, !!opts.micLostOnGrant, opts.leave || "", !!opts.closeTab]);
    if (url === "-") url = (ready && (await ready())) || null;
    if (!url) throw new Error("no URL came for the run");
    if (opts.forward) {
      forward = await startForward(url, opts.holdStream);
      out.forward = forward.stats;
      url = forward.url;
    }
    await page.goto(url, { waitUntil: "load" });
    if (opts.cspProbe) {
      const logged = out.console.length;
      const ran = await page.evaluate(() => {
        const s = document.createElement("script");
        s.textContent = "window.__inlineRan = true";
        document.head.appendChild(s);
        s.remove();
        return !!window.__inlineRan;
      });
      // Reported twice: the event, and the console's line. Both are waited
      // for (on a loaded machine the line can come well after the event):
      // either one coming after the reset below would count as the page's.
      const seen = (kind) => out.cspViolations.some((v) => v.startsWith(kind));
      const until = Date.now() + 10000;
      while (!(seen("event:") && seen("console:")) && Date.now() < until) await sleep(20);
      out.cspProbe = { ran, reported: out.cspViolations.length };
      out.cspViolations = [];
      out.console.length = logged; // the probe's own report
    }
    if (opts.dial) {
      await button(page, "Call").click();
      await page.waitForURL(/\/mock\/call\//, { timeout: 10000 });
      url = page.url();
      out.callId = callIdOf(url);
    }

    const samples = [];
    const start = Date.now();
    const deadline = start + opts.timeout;
    const watchRing = opts.apiHangup || opts.answerElsewhere || opts.letRing || opts.ringFault || opts.ringCheckFault;
    const wantReport = !opts.noReport && !opts.denyMic && !opts.decline && !watchRing && !opts.answerFault
      && !opts.hookHangup
      && opts.hangupAfter == null
      && opts.cutAfter == null && opts.micLostAfter == null && !opts.micLostOnGrant && opts.oversizeAfter == null;
    let rang = false;
    let leftOver = false; // --leave: over at callagent, the microphone let go
    // Whether the call is over at callagent, as its link's view says.
    const over_at_callagent = async () => {
      const u = new URL(url);
      const view = await fetch(`${u.origin}/mock/api/ring/${u.pathname.split("/").pop()}${u.search}`)
        .then((res) => res.json())
        .catch(() => null);
      return !!view && FINAL.includes(view.status);
    };
    const micLive = () =>
      (window.__micStreams || []).some((m) => m.getAudioTracks().some((t) => t.readyState === "live"));
    let cutAt = null;
    let endedAfterCut = null;
    let connectedAt = null;
    let pressed = false;
    let held = !opts.hold;
    let hungUp = false;
    let oversized = false;
    let micLost = false;
    let liveShot = !opts.liveShot;
    let done = false;
    let last = null;
    // A look at the page that may come as its tab closes (--close): "closed".
    const look = (fn, arg) =>
      page.evaluate(fn, arg).catch((e) => {
        if (tabClosed) return "closed";
        throw e;
      });
    while (Date.now() < deadline) {
      if (tabClosed) {
        await tabClosed;
        out.left = { closed: true };
        done = true;
        break;
      }
      const got = await look(() => {
        const p = window.mockPhone;
        if (!p) return null;
        const report = document.getElementById("report");
        // Hang up as it is at this very state (a look after this evaluate
        // could see the state after it).
        const h = document.getElementById("hangup");
        const shown = !!h && h.getClientRects().length > 0 && getComputedStyle(h).visibility !== "hidden";
        return { stats: p.stats, reportShown: !!report && !report.hidden,
          hangup: { visible: shown, enabled: shown && !h.disabled } };
      });
      if (got === "closed") continue;
      last = got;
      if (last) {
        const s = last.stats;
        const now = Date.now();
        samples.push([
          now - start,
          s.playedSamples,
          s.clears,
          Math.round(s.lastPeak * 1000) / 1000,
          s.mediaReceived,
          s.framesSent,
          s.droppedOnClear,
          s.marksEchoed,
        ]);
        if (s.state === "connected" && connectedAt === null) connectedAt = now;
        // The last look at Hang up while the page answered (and connects).
        if (s.state === "answering") out.hangupWhileAnswering = last.hangup;
        if (!rang && s.state === "ringing") {
          rang = true;
          out.ring = await ringView(page);
          if (opts.ringShot) {
            fs.mkdirSync(path.dirname(opts.ringShot), { recursive: true });
            await page.screenshot({ path: opts.ringShot, fullPage: true });
          }
          if (opts.decline) await button(page, "Decline").click();
          else if (opts.apiHangup) out.action = await post(new URL(url).origin + "/v1/calls/" + callIdOf(url) + "/hangup", {});
          else if (opts.answerElsewhere) {
            out.action = await post(new URL(url).origin + "/mock/api/answer", {
              callId: callIdOf(url),
              token: new URL(url).searchParams.get("t"),
            });
          } else if (opts.letRing || opts.ringFault || opts.ringCheckFault) {
            // Nobody answers.
          } else if (opts.answerKey) await page.keyboard.press("Enter");
          else await button(page, "Answer").click();
        }
        if (connectedAt !== null && s.state === "connected") {
          if (!pressed && opts.press) {
            pressed = true;
            for (const d of opts.press) await page.click(`#keypad button[data-digit="${d}"]`);
          }
          if (!held) {
            held = true;
            for (let i = 0; i < 5; i++) await page.keyboard.down(opts.hold);
            await page.keyboard.up(opts.hold);
          }
          if (!liveShot && now - connectedAt >= 2000) {
            liveShot = true;
            fs.mkdirSync(path.dirname(opts.liveShot), { recursive: true });
            await page.screenshot({ path: opts.liveShot, fullPage: true });
          }
          if (cutAt === null && forward && opts.cutAfter != null && now - connectedAt >= opts.cutAfter) {
            cutAt = now;
            forward.cut();
          }
          if (opts.reloadAfter != null && now - connectedAt >= opts.reloadAfter) {
            out.reload = { stats: s };
            await page.reload({ waitUntil: "load" });
            Object.assign(out.reload, await shownAgain(page));
            last = await page.evaluate(() => ({ stats: window.mockPhone.stats }));
            done = true;
            break;
          }
          if (opts.cacheAfter != null && now - connectedAt >= opts.cacheAfter) {
            // In the cache (after pagehide, before pageshow): whether a
            // microphone track is still live.
            const micLiveInCache = await page.evaluate(() => {
              window.__beforeCache = true; // gone once the page loaded again
              window.dispatchEvent(new PageTransitionEvent("pagehide", { persisted: true }));
              return (window.__micStreams || []).some((s) => s.getAudioTracks().some((t) => t.readyState === "live"));
            });
            await page.evaluate(() => window.dispatchEvent(new PageTransitionEvent("pageshow", { persisted: true })));
            const until = Date.now() + 5000;
            let reloaded = false;
            while (!reloaded && Date.now() < until) {
              await sleep(50);
              reloaded = await page.evaluate(() => !window.__beforeCache).catch(() => false);
            }
            await page.waitForLoadState("load");
            out.back = { reloaded, micLiveInCache, ...(await shownAgain(page)) };
            last = await page.evaluate(() => ({ stats: window.mockPhone.stats }));
            done = true;
            break;
          }
          if (!micLost && opts.micLostAfter != null && now - connectedAt >= opts.micLostAfter) {
            micLost = true;
            out.micLostMs = now - start;
            await page.evaluate(() => {
              for (const s of window.__micStreams || []) {
                for (const t of s.getAudioTracks()) {
                  t.stop(); // which fires no ended: an ended device does
                  t.dispatchEvent(new Event("ended"));
                }
              }
            });
          }
          if (!oversized && opts.oversizeAfter != null && now - connectedAt >= opts.oversizeAfter) {
            oversized = true;
            await page.evaluate(() => window.__sockets.at(-1).send("x".repeat(300 * 1024)));
          }
          if (opts.hookHangup === "connected" && !out.hook && now - connectedAt >= 300) {
            // Twice, as a double press; what it threw, if anything.
            out.hook = await page.evaluate(() => {
              try {
                window.mockPhone.hangup();
                window.mockPhone.hangup();
                return { threw: false };
              } catch (e) {
                return { threw: String(e) };
              }
            });
          }
          if (!hungUp && opts.hangupAfter != null && now - connectedAt >= opts.hangupAfter) {
            hungUp = true;
            out.hungUpMs = now - start;
            await page.click("#hangup");
          }
        }
        const over = !["opening", "ringing", "answering", "connected"].includes(s.state);
        const sinceLeft = opts.leave && (await look(() => window.__leftAt && performance.now() - window.__leftAt));
        if (sinceLeft === "closed") continue;
        if (opts.hookHangup === "answer") {
          // Once the page read the answer's reply (it connects at once, or never).
          if (over && (await page.evaluate(() => !!window.__answerRead))) {
            out.hook = await page.evaluate(() => ({ sockets: window.__sockets.length }));
            done = true;
            break;
          }
        } else if (opts.leave) {
          if (leftOver) {
            out.left = await page.evaluate(() => ({
              micLive: (window.__micStreams || []).some((m) => m.getAudioTracks().some((t) => t.readyState === "live")),
              state: window.mockPhone.stats.state,
              framesSent: window.mockPhone.stats.framesSent,
            }));
            done = true;
            break;
          }
          if (!opts.closeTab && sinceLeft > 0 && (await over_at_callagent()) && !(await look(micLive))) leftOver = true;
        } else if (cutAt !== null) {
          // callagent is gone: no final status will come; the page is watched
          // from when it has ended (a loaded machine may take a while to show
          // it) and its last poll, if one was under way, has failed.
          if (endedAfterCut === null && s.state === "ended") endedAfterCut = now;
          const from = endedAfterCut === null ? null : Math.max(cutAt + 1500, endedAfterCut + 1000);
          if (from !== null && now >= from && !out.afterCut) out.afterCut = { errorsSoon: s.errors.length };
          if (out.afterCut && now - from >= 1500) {
            out.afterCut.errorsLater = s.errors.length;
            done = true;
            break;
          }
        } else if (hungUp && Date.now() - start < out.hungUpMs + (opts.watchAfter || 0)) {
          // Watched a while past the click: what the page still plays.
        } else if (over && (opts.decline || watchRing || opts.answerFault || (FINAL.includes(s.callStatus) && (!wantReport || last.reportShown)))) {
          done = true;
          break;
        }
      }
      await sleep(100);
    }
    out.stats = last && last.stats;
    out.samples = samples;
    if (tabClosed) {
      // Closed: nothing more of the page to see.
      if (out.cspViolations.length) throw new Error(`Content-Security-Policy violations: ${out.cspViolations.join("; ")}`);
      out.ok = true;
      return;
    }
    out.banner = await visibleText(page, "banner");
    out.problem = await visibleText(page, "problem");
    out.status = await visibleText(page, "status");
    out.ringTitle = await visibleText(page, "ring-title");
    out.buttons = { answer: await buttonState(page, "Answer"), decline: await buttonState(page, "Decline") };
    out.micRequests = await page.evaluate(() => window.__micRequests);
    out.micLive = await page.evaluate(() =>
      (window.__micStreams || []).some((m) => m.getAudioTracks().some((t) => t.readyState === "live")),
    );
    out.reportText = await visibleText(page, "report");
    out.transcriptText = await visibleText(page, "transcript");
    out.endText = await visibleText(page, "end-reason");
    fs.mkdirSync(path.dirname(shot), { recursive: true });
    await page.screenshot({ path: shot, fullPage: true });
    if (!done) throw new Error(`the call did not end on the page within ${opts.timeout} ms (state ${last && last.stats.state})`);
    if (!rang && !opts.ringFault) throw new Error(`the page never rang (state ${last && last.stats.state})`);
    if (out.cspViolations.length) throw new Error(`Content-Security-Policy violations: ${out.cspViolations.join("; ")}`);
    if (opts.reopen) {
      await page.goto(url, { waitUntil: "load" });
      const st = await settledState(page); // the link's view tells a used link at once
      out.reopen = { state: st, problem: await visibleText(page, "problem") };
      if (out.cspViolations.length) throw new Error(`Content-Security-Policy violations: ${out.cspViolations.join("; ")}`);
    }
    out.ok = true;
  } finally {
    if (context) await context.close().catch(() => {});
    if (forward) forward.cut(); // else its listener keeps node running
  }
}

function callIdOf(u) {
  return decodeURIComponent(new URL(u).pathname.split("/").pop());
}

async function post(u, body) {
  const res = await fetch(u, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  return { status: res.status, body: await res.json().catch(() => null) };
}

async function ringView(page) {
  const view = await page.evaluate(async () => {
    const text = (id) => document.getElementById(id).innerText.trim();
    let micPermission = null;
    try {
      micPermission = (await navigator.permissions.query({ name: "microphone" })).state;
    } catch {}
    return {
      title: text("ring-title"),
      from: text("ring-from"),
      to: text("ring-to"),
      call: text("ring-call"),
      banner: text("banner"),
      status: text("status"),
      focused: document.activeElement && document.activeElement.id,
      micRequests: window.__micRequests,
      micPermission,
    };
  });
  view.answer = await buttonState(page, "Answer");
  view.decline = await buttonState(page, "Decline");
  return view;
}

// --serve: runs read from stdin, one JSON line each, {id, args} (args as on
// the command line), one after the other in the same browsers; each run's
// result is one JSON line, with its id. A run whose URL is "-" first
// prints {id, ready: true} and reads the URL as the next line ({id, url}).
// At the end of stdin the browsers close and the process ends.
async function serve() {
  const lines = [];
  let waiting = null;
  let ended = false;
  const rl = readline.createInterface({ input: process.stdin });
  rl.on("line", (l) => {
    lines.push(l);
    if (waiting) waiting();
  });
  rl.on("close", () => {
    ended = true;
    if (waiting) waiting();
  });
  const next = async () => {
    while (!lines.length && !ended) await new Promise((r) => (waiting = r));
    waiting = null;
    return lines.length ? JSON.parse(lines.shift()) : null;
  };
  const write = (o) => process.stdout.write(JSON.stringify(o) + "\n");
  for (let m = await next(); m; m = await next()) {
    const out = await job(m.args, async () => {
      write({ id: m.id, ready: true });
      const u = await next();
      return u && u.url;
    });
    write({ id: m.id, ...out });
  }
  await closeBrowsers();
}

if (process.argv[2] === "--serve") {
  serve().then(
    () => process.exit(0),
    (e) => {
      process.stderr.write(String(e && e.stack ? e.stack : e) + "\n");
      process.exit(1);
    },
  );
} else {
  job(process.argv.slice(2)).then(async (out) => {
    await closeBrowsers();
    process.stdout.write(JSON.stringify(out) + "\n");
    process.exit(out.ok ? 0 : 1);
  });
}
