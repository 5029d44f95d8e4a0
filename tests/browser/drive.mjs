// drive.mjs: opens the mock phone page in a real, headless Chromium and
// reports what happened, for tests/test_mock_browser.lua.
//
//   node tests/browser/drive.mjs URL WAV SCREENSHOT [options]
//     URL         the hint of a mock call (http://127.0.0.1:PORT/mock/call/ID?t=...)
//     WAV         16-bit PCM WAV the fake microphone plays (looped by Chromium)
//     SCREENSHOT  where the PNG of the page at the end goes
//   --deny-mic          the microphone is refused: no fake-UI auto-accept,
//                       --deny-permission-prompts, and the context grants nothing
//   --press=DIGITS      once connected, click these keypad keys
//   --hangup-after=MS   click Hang up MS after the stream connected
//   --live-shot=PATH    a screenshot 2 s after the stream connected
//   --reopen            at the end, open URL again (a used link) and record
//                       what the page says in .reopen {state, problem}
//   --mic-delay=MS      the microphone is granted MS after the page asks (a person
//                       reading the prompt)
//   --decline           click Decline while the page rings (with --mic-delay, so
//                       that it has not answered yet); the end is then the page
//                       leaving "answering", whatever the call's status
//   --forward           open URL through a TCP forward on another port (as
//                       ssh -L does), which counts the connections that upgrade
//                       to /voice/stream: .forward {streams}
//   --cut-after=MS      with --forward: MS after the stream connected, close
//                       the forward and all its connections (callagent gone,
//                       as the page sees it), then watch the page 3 s more:
//                       .afterCut {errorsAt1500ms, errorsAt3000ms}
//   --timeout=MS        how long to wait for the end (default 30000)
//   --chromium=PATH     the browser (default /usr/bin/chromium)
//
// The end: the page's state is no longer "answering" or "connected", the
// call status it polls is final, and - unless --deny-mic or --hangup-after -
// the report is on the page. window.mockPhone.stats is sampled every 100 ms
// meanwhile. Then the screenshot is saved and one JSON line printed:
//   {ok, elapsedMs, stats, samples: [[ms, playedSamples, clears, lastPeak,
//    mediaReceived, framesSent, droppedOnClear, marksEchoed]...],
//    banner, problem, status, reportText, transcriptText, endText, console,
//    reopen}
// ok is false (exit status 1) with .error when something failed on the way.
import { chromium } from "playwright-core";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";

const positional = [];
const opts = { timeout: 30000, chromium: "/usr/bin/chromium", denyMic: false, press: "", hangupAfter: null };
for (const a of process.argv.slice(2)) {
  if (a === "--deny-mic") opts.denyMic = true;
  else if (a === "--reopen") opts.reopen = true;
  else if (a === "--decline") opts.decline = true;
  else if (a.startsWith("--press=")) opts.press = a.slice(8);
  else if (a.startsWith("--hangup-after=")) opts.hangupAfter = Number(a.slice(15));
  else if (a.startsWith("--live-shot=")) opts.liveShot = a.slice(12);
  else if (a.startsWith("--timeout=")) opts.timeout = Number(a.slice(10));
  else if (a.startsWith("--mic-delay=")) opts.micDelay = Number(a.slice(12));
  else if (a.startsWith("--chromium=")) opts.chromium = a.slice(11);
  else if (a === "--forward") opts.forward = true;
  else if (a.startsWith("--cut-after=")) opts.cutAfter = Number(a.slice(12));
  else positional.push(a);
}
let [url, wav, shot] = positional;
const out = { ok: false, console: [] };
const t0 = Date.now();
const FINAL = ["completed", "busy", "no_answer", "failed", "canceled"];

function finish(code) {
  out.elapsedMs = Date.now() - t0;
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exitCode = code;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A TCP forward from a port of its own to the URL's (ssh -L, in small).
async function startForward(target) {
  const t = new URL(target);
  const sockets = new Set();
  const stats = { streams: 0 };
  const server = net.createServer((c) => {
    const up = net.connect(Number(t.port), t.hostname);
    sockets.add(c);
    sockets.add(up);
    c.once("data", (d) => {
      if (/^GET \/voice\/stream[ ?]/.test(d.toString("latin1"))) stats.streams++;
    });
    c.pipe(up);
    up.pipe(c);
    const end = () => {
      c.destroy();
      up.destroy();
      sockets.delete(c);
      sockets.delete(up);
    };
    c.on("error", end).on("close", end);
    up.on("error", end).on("close", end);
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

async function visibleText(page, id) {
  return page.evaluate((i) => {
    const el = document.getElementById(i);
    return el && !el.hidden ? el.innerText.trim() : "";
  }, id);
}

async function run() {
  if (!url || !wav || !shot) throw new Error("usage: drive.mjs URL WAV SCREENSHOT [options]");
  if (!fs.existsSync(opts.chromium)) {
    throw new Error(`${opts.chromium} is missing: install Debian's chromium (apt-get install -y chromium)`);
  }
  if (!fs.existsSync(wav)) throw new Error(`no such WAV file: ${wav}`);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "callagent-chromium-"));
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
    "--autoplay-policy=no-user-gesture-required",
  ];
  args.push(opts.denyMic ? "--deny-permission-prompts" : "--use-fake-ui-for-media-stream");
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: opts.chromium,
      headless: true,
      args,
      viewport: { width: 1100, height: 860 },
      permissions: [],
    });
    const page = context.pages()[0] || (await context.newPage());
    page.on("console", (m) => {
      if (m.type() === "error" || m.type() === "warning") out.console.push(`${m.type()}: ${m.text()}`.slice(0, 300));
    });
    page.on("pageerror", (e) => out.console.push(`pageerror: ${e.message}`.slice(0, 300)));
    if (opts.micDelay) {
      await page.addInitScript((ms) => {
        const md = navigator.mediaDevices;
        const ask = md.getUserMedia.bind(md);
        md.getUserMedia = (c) => new Promise((r) => setTimeout(r, ms)).then(() => ask(c));
      }, opts.micDelay);
    }
    let forward = null;
    if (opts.forward) {
      forward = await startForward(url);
      out.forward = forward.stats;
      url = forward.url;
    }
    await page.goto(url, { waitUntil: "load" });

    const samples = [];
    const start = Date.now();
    const deadline = start + opts.timeout;
    const wantReport = !opts.denyMic && !opts.decline && opts.hangupAfter == null && opts.cutAfter == null;
    let declined = false;
    let cutAt = null;
    let connectedAt = null;
    let pressed = false;
    let hungUp = false;
    let liveShot = !opts.liveShot;
    let done = false;
    let last = null;
    while (Date.now() < deadline) {
      last = await page.evaluate(() => {
        const p = window.mockPhone;
        if (!p) return null;
        const report = document.getElementById("report");
        return { stats: p.stats, reportShown: !!report && !report.hidden };
      });
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
        if (opts.decline && !declined && s.state === "answering" && (await page.isVisible("#decline"))) {
          declined = true;
          await page.click("#decline");
        }
        if (connectedAt !== null && s.state === "connected") {
          if (!pressed && opts.press) {
            pressed = true;
            for (const d of opts.press) await page.click(`#keypad button[data-digit="${d}"]`);
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
          if (!hungUp && opts.hangupAfter != null && now - connectedAt >= opts.hangupAfter) {
            hungUp = true;
            await page.click("#hangup");
          }
        }
        const over = s.state !== "answering" && s.state !== "connected";
        if (cutAt !== null) {
          // callagent is gone: no final status will come; the page is watched.
          if (now - cutAt >= 1500 && !out.afterCut) out.afterCut = { errorsAt1500ms: s.errors.length };
          if (now - cutAt >= 3000) {
            out.afterCut.errorsAt3000ms = s.errors.length;
            done = true;
            break;
          }
        } else if (over && (opts.decline || (FINAL.includes(s.callStatus) && (!wantReport || last.reportShown)))) {
          done = true;
          break;
        }
      }
      await sleep(100);
    }
    out.stats = last && last.stats;
    out.samples = samples;
    out.banner = await visibleText(page, "banner");
    out.problem = await visibleText(page, "problem");
    out.status = await visibleText(page, "status");
    out.reportText = await visibleText(page, "report");
    out.transcriptText = await visibleText(page, "transcript");
    out.endText = await visibleText(page, "end-reason");
    fs.mkdirSync(path.dirname(shot), { recursive: true });
    await page.screenshot({ path: shot, fullPage: true });
    if (!done) throw new Error(`the call did not end on the page within ${opts.timeout} ms (state ${last && last.stats.state})`);
    if (opts.reopen) {
      await page.goto(url, { waitUntil: "load" });
      const until = Date.now() + 5000;
      let st = null;
      while (Date.now() < until) {
        st = await page.evaluate(() => window.mockPhone && window.mockPhone.stats.state);
        // The microphone comes before the answer: refused, the page then
        // answers (to end the call) and learns the link was used.
        if (st && st !== "answering" && st !== "mic-denied") break;
        await sleep(50);
      }
      out.reopen = { state: st, problem: await visibleText(page, "problem") };
    }
    out.ok = true;
  } finally {
    if (context) await context.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

run().then(
  () => finish(0),
  (e) => {
    out.error = String(e && e.message ? e.message : e);
    finish(1);
  },
);
