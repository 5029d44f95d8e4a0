// callagent for Clawdbot: the tools call_agent, call_agent_status and
// call_agent_hangup, each one request to a running callagent's REST API
// (POST /v1/calls, GET /v1/calls/{id}, POST /v1/calls/{id}/hangup).
//
// Plain ESM for Node >= 20, no dependencies (global fetch). Clawdbot loads it
// from package.json "clawdbot.extensions" and calls register(api) once;
// config comes from plugins.entries.callagent.config (api.pluginConfig),
// checked first against configSchema in clawdbot.plugin.json.
import { randomUUID } from "node:crypto";

const DEFAULT_BASE_URL = "http://127.0.0.1:4545";
const DEFAULT_TIMEOUT_MS = 20000; // longer than callagent waits on the vendor (a dial: 15 s by default)
const CONFIG_KEY = "plugins.entries.callagent.config";

const FINAL = new Set(["completed", "busy", "no_answer", "failed", "canceled"]);
const CALL_ID = /^[A-Za-z0-9_-]{1,100}$/;
const TOKEN_CHARS = /^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$/;

class ToolInputError extends Error {}

function fieldError(field, message, value) {
  const got = value === undefined ? "" : ` (got ${shortJson(value)})`;
  return new ToolInputError(`field "${field}": ${message}${got}`);
}

function shortJson(v) {
  let s;
  try {
    s = JSON.stringify(v);
  } catch {
    s = String(v);
  }
  if (s === undefined) s = String(v);
  return s.length > 60 ? s.slice(0, 57) + "..." : s;
}

function paramsObject(params) {
  if (params === undefined || params === null) return {};
  if (typeof params !== "object" || Array.isArray(params)) throw new ToolInputError("the parameters must be an object");
  return params;
}

// The call's fields go to callagent as they are: it checks them (E.164, the
// voices its model offers, a time zone against its tz database, ...) and its
// 400 names the field, which apiError passes on. One set of rules, callagent's.
// But for an optional text left empty: Clawdbot's check of a tool call's
// arguments (ajv with coerceTypes) makes a model's null "", which callagent
// refuses for timezone, locale and voice; the model meant "not given".
const OPTIONAL_TEXT = ["timezone", "locale", "callerName", "calleeName", "voice"];

function callRequest(params) {
  const p = { ...paramsObject(params) };
  for (const k of ["to", "prompt"]) {
    if (p[k] === undefined || p[k] === null) throw fieldError(k, "required");
  }
  for (const k of OPTIONAL_TEXT) {
    if (typeof p[k] === "string" && p[k].trim() === "") delete p[k];
  }
  return p;
}

function callIdParam(params) {
  const v = paramsObject(params).callId;
  if (v === undefined || v === null) throw fieldError("callId", "required: the callId call_agent returned");
  if (typeof v !== "string" || !CALL_ID.test(v.trim())) throw fieldError("callId", "expected a call id like c_03429f0b0f6a2b3ba32c", v);
  return v.trim();
}

// Idempotency-Key for POST /v1/calls: one per run of the tool, so that its
// second send (after a first that got no answer) gets the call the first
// placed instead of a second ring. Not the tool call id: that is unique only
// within a conversation for some models (Kimi K2 numbers its calls
// functions.call_agent:0, :1, ... in each new session) and the Gateway's
// POST /tools/invoke gives http-<Date.now()>, the same to two requests in one
// millisecond; a key of it made a later, new call_agent a replay of an old
// call (nothing dialed) or a 422 the model could not get past. Clawdbot runs
// a tool call once, so no second run of one is lost.
export function idempotencyKey() {
  return `clawdbot-${randomUUID()}`;
}

export function resolveConfig(raw, env = process.env) {
  const cfg = raw && typeof raw === "object" ? raw : {};
  const baseRaw = cfg.baseUrl ?? DEFAULT_BASE_URL;
  let u;
  try {
    u = new URL(String(baseRaw));
  } catch {
    u = null;
  }
  if (!u || (u.protocol !== "http:" && u.protocol !== "https:") || u.search || u.hash || u.username || u.password) {
    throw new Error(`${CONFIG_KEY}.baseUrl: expected callagent's http(s) URL like ${DEFAULT_BASE_URL}, without user, query or fragment (the token goes in apiToken)`);
  }
  const baseUrl = u.href.replace(/\/+$/, "");
  const token = cfg.apiToken ?? (env.CALLAGENT_API_TOKEN || undefined);
  // It goes in the Authorization header: printable ASCII (fetch refuses a
  // line break or a tab, and a character over U+00FF; one from U+0080 to
  // U+00FF would go as a byte that is not its UTF-8, and never match).
  if (token !== undefined && (typeof token !== "string" || !TOKEN_CHARS.test(token) || token.length < 16)) {
    throw new Error(`${CONFIG_KEY}.apiToken: expected callagent's server.apiToken (at least 16 printable ASCII characters, no spaces at either end)`);
  }
  const timeoutMs = cfg.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  if (!Number.isInteger(timeoutMs) || timeoutMs < 100 || timeoutMs > 120000) {
    throw new Error(`${CONFIG_KEY}.timeoutMs: expected an integer from 100 to 120000, got ${shortJson(timeoutMs)}`);
  }
  // Shown in messages.
  const shown = `${u.protocol}//${u.host}${u.pathname.replace(/\/+$/, "")}`;
  return { baseUrl, apiToken: token, timeoutMs, shown };
}

function redact(cfg, s) {
  return cfg.apiToken ? String(s).split(cfg.apiToken).join("[redacted]") : String(s);
}

// Failures that may come after callagent carried the request out: the
// connection closed before the answer (a timeout is the other). Any other
// (ECONNREFUSED, ENOTFOUND, a port fetch refuses) means nothing was sent.
const UNANSWERED = new Set(["UND_ERR_SOCKET", "ECONNRESET", "EPIPE", "UND_ERR_HEADERS_TIMEOUT", "UND_ERR_BODY_TIMEOUT"]);
// Said of a POST after any of those, or an error that may have come after
// the request was carried out.
const MAYBE_DONE = "The request may still have been carried out";
const FIRST_UNANSWERED = `${MAYBE_DONE}: its first send got no answer.`;

function notReachable(cfg, err, method) {
  let why, unanswered;
  if (err && (err.name === "TimeoutError" || err.cause?.name === "TimeoutError")) {
    why = `no answer within ${cfg.timeoutMs} ms`;
    unanswered = true;
  } else {
    const c = err?.cause;
    why = c?.code || c?.message || err?.message || String(err);
    unanswered = UNANSWERED.has(c?.code);
  }
  let msg = `callagent is not reachable at ${cfg.shown} (${why}); is it running, and is ${CONFIG_KEY}.baseUrl its address?`;
  if (method === "POST" && unanswered) {
    msg += ` ${MAYBE_DONE}.`;
  }
  const e = new Error(redact(cfg, msg));
  e.unanswered = unanswered;
  return e;
}

// The most of an answer read: callagent's largest, a long call's record
// with its transcript, is far smaller. Something else at baseUrl may send
// without end, into the host's memory, until timeoutMs.
const MAX_ANSWER = 16 * 1024 * 1024;

class TooLarge extends Error {}

async function readCapped(res) {
  const chunks = [];
  let n = 0;
  // Leaving the loop by the throw cancels the body: the rest is not read.
  for await (const chunk of res.body ?? []) {
    n += chunk.length;
    if (n > MAX_ANSWER) throw new TooLarge();
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}

async function request(cfg, method, path, { body, headers = {}, signal } = {}) {
  const h = { Accept: "application/json", ...headers };
  if (cfg.apiToken) h.Authorization = `Bearer ${cfg.apiToken}`;
  if (body !== undefined) h["Content-Type"] = "application/json";
  const timeout = AbortSignal.timeout(cfg.timeoutMs);
  const sig = signal ? AbortSignal.any([signal, timeout]) : timeout;
  let res, text;
  try {
    // A redirect is not followed: the bearer token goes to callagent only.
    res = await fetch(cfg.baseUrl + path, {
      method,
      headers: h,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: sig,
      redirect: "manual",
    });
    text = await readCapped(res);
  } catch (err) {
    if (signal?.aborted) throw err; // the host cancelled the tool call
    if (err instanceof TooLarge) {
      throw new Error(`callagent at ${cfg.shown} answered HTTP ${res.status} of more than ${MAX_ANSWER / 1048576} MiB, which is not callagent's; is ${CONFIG_KEY}.baseUrl callagent's address?`);
    }
    throw notReachable(cfg, err, method);
  }
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    json = null;
  }
  return { status: res.status, headers: res.headers, json };
}

// resent: the answer is to a second send of a request whose first got none,
// which may have been carried out whatever this answer says.
function apiError(cfg, r, { callId, method, resent } = {}) {
  // callagent's error is {"error": {"code", "message", "field"?}}; anything
  // else (a 2xx without what it always holds, a proxy's page) is not its.
  const theirs = r.json && typeof r.json === "object" && r.json.error && typeof r.json.error === "object";
  const e = theirs ? r.json.error : {};
  const code = typeof e.code === "string" ? e.code : `http_${r.status}`;
  const message = typeof e.message === "string" ? e.message : "no error message";
  const tag = `(${r.status} ${code})`;
  let msg;
  if (r.status >= 300 && r.status < 400) {
    msg = `callagent at ${cfg.shown} answered a redirect ${r.status}; set ${CONFIG_KEY}.baseUrl to callagent's own address`;
  } else if (r.status === 401) {
    msg = cfg.apiToken
      ? `callagent at ${cfg.shown} refused the apiToken ${tag}: set ${CONFIG_KEY}.apiToken to callagent's server.apiToken`
      : `callagent at ${cfg.shown} needs an apiToken ${tag}: set ${CONFIG_KEY}.apiToken to callagent's server.apiToken`;
  } else if (!theirs) {
    msg = `callagent at ${cfg.shown} answered HTTP ${r.status} that is not callagent's ${r.json ? "answer" : "JSON"}; is ${CONFIG_KEY}.baseUrl callagent's address?`;
  } else if (r.status === 403) {
    msg = `callagent at ${cfg.shown} refused the request ${tag}: ${message}. Without server.apiToken it answers only requests to a loopback address; set server.apiToken in callagent and ${CONFIG_KEY}.apiToken here`;
  } else if (r.status === 404 && code === "not_found" && message.startsWith("no route ")) {
    // callagent's 404 for a path it has no route for: a baseUrl with a path.
    msg = `callagent at ${cfg.shown} has no route ${message.replace(/^no route (for )?/, "")} ${tag}: set ${CONFIG_KEY}.baseUrl to callagent's address; the plugin adds /v1 itself`;
  } else if (r.status === 404 && callId !== undefined && code === "not_found") {
    msg = `field "callId": callagent has no call ${callId} ${tag}`;
  } else if (r.status === 409 && code === "not_active") {
    msg = `call ${callId} has already ended ${tag}; call_agent_status tells how`;
  } else if (r.status === 422 && code === "idempotency_key_reused") {
    msg = `this tool call id was already used to place a different call ${tag}`;
  } else if (r.status === 503) {
    const after = r.headers.get("retry-after");
    const head = `callagent is ${code === "starting" ? "starting" : code === "shutting_down" || code === "closing" ? "shutting down" : "busy"}`;
    // callagent's own messages already say so; a pause says why after its head.
    const told = code === "paused" ? `callagent has paused calls: ${message.replace(/^calls are paused: /, "")}`
      : message.startsWith(head) ? message : `${head}: ${message}`;
    msg = `${told}${after ? `; try again in ${after} s` : ""} ${tag}`;
  } else if (r.status >= 500) {
    // Its own failure (the store, a bug), not a refusal of the input.
    msg = `callagent failed: ${message} ${tag}; its log says why`;
    // store_failed: nothing was stored, so nothing was done.
    if (method === "POST" && code !== "store_failed" && !resent) msg += `. ${MAYBE_DONE}.`;
  } else if (typeof e.field === "string" && e.field) {
    msg = `field "${e.field}": callagent refused it: ${message} ${tag}`;
  } else {
    msg = `callagent refused the request: ${message} ${tag}`;
  }
  if (resent) msg += `. ${FIRST_UNANSWERED}`;
  return new Error(redact(cfg, msg));
}

// What Clawdbot's own tools return (jsonResult in src/agents/tools/common.ts):
// the payload as JSON text for the model, and as details for the host.
function jsonResult(payload) {
  return { content: [{ type: "text", text: JSON.stringify(payload, null, 2) }], details: payload };
}

function summarize(rec, includeTranscript) {
  const attempts = Array.isArray(rec.attempts) ? rec.attempts : [];
  const last = attempts[attempts.length - 1];
  const out = {
    callId: rec.callId,
    status: rec.status,
    final: FINAL.has(rec.status),
    to: rec.to,
  };
  if (rec.calleeName) out.calleeName = rec.calleeName;
  if (rec.endReason) out.endReason = rec.endReason;
  out.outcome = rec.report?.outcome ?? null;
  out.report = rec.report ?? null;
  out.attempts = {
    count: attempts.length,
    last: last
      ? { n: last.n, status: last.status, reason: last.reason, startedAt: last.startedAt, answeredAt: last.answeredAt, endedAt: last.endedAt }
      : null,
  };
  if (rec.nextAttemptAt) out.nextAttemptAt = rec.nextAttemptAt;
  if (rec.lastError) out.lastError = rec.lastError;
  if (rec.hint) out.hint = rec.hint;
  out.createdAt = rec.createdAt;
  if (rec.completedAt) out.completedAt = rec.completedAt;
  if (includeTranscript) out.transcript = rec.transcript ?? [];
  return out;
}

export function createTools(cfg) {
  const callAgent = {
    name: "call_agent",
    label: "Call Agent",
    description:
      "Place a phone call carried out by an AI voice agent (callagent). Give the number in E.164 and a detailed prompt: " +
      "the agent's task, and the shape of the report you want back. Returns a callId at once; the call runs in the " +
      "background. Check it with call_agent_status; when it ends, a report also arrives as a notification if " +
      "callagent's notify hooks point at Clawdbot.",
    parameters: {
      type: "object",
      additionalProperties: false,
      properties: {
        to: { type: "string", description: "Number to call, E.164 (+15551234567)" },
        prompt: { type: "string", description: "The agent's task, in detail (at most 8000 bytes)" },
        timezone: { type: "string", description: "IANA time zone for the agent, e.g. America/Los_Angeles" },
        locale: { type: "string", description: "Language tag, e.g. en-US" },
        callerName: { type: "string", description: "On whose behalf the agent calls" },
        calleeName: { type: "string", description: "Who the agent expects to reach" },
        voice: { type: "string", description: "The agent's voice: one the realtime model offers (alloy, marin, ...)" },
        metadata: { type: "object", description: "Any JSON object, kept with the call and sent back in the notification" },
      },
      required: ["to", "prompt"],
    },
    async execute(_toolCallId, params, signal) {
      const body = callRequest(params);
      // One key for both sends below.
      const key = idempotencyKey();
      const send = (k) => request(cfg, "POST", "/v1/calls", { body, headers: k ? { "Idempotency-Key": k } : {}, signal });
      let r;
      let resent = false;
      try {
        r = await send(key);
      } catch (err) {
        if (!err.unanswered) throw err;
        resent = true;
        // The call may have been placed and its answer lost: sent again with
        // the same Idempotency-Key, callagent answers with that call (or
        // places it now), and the callee's phone rings once.
        try {
          r = await send(key);
        } catch (again) {
          // Not sent this time (callagent gone, say): the first still may have been carried out.
          if (!again.unanswered && !signal?.aborted) again.message += ` ${FIRST_UNANSWERED}`;
          throw again;
        }
      }
      if (r.status === 501 && r.json?.error?.code === "idempotency_unsupported") {
        // A store that keeps no keys (one of an app's own): callagent refused
        // the header before doing anything, and takes the call without it.
        // This answer, if lost, is not asked for again: without a key, a
        // resend could ring the callee twice.
        r = await send(undefined);
        resent = false; // the first, too, was refused before anything was done
      }
      if (r.status !== 201 || !r.json || typeof r.json.callId !== "string") throw apiError(cfg, r, { method: "POST", resent });
      const out = { callId: r.json.callId, status: r.json.status, to: body.to };
      if (r.json.hint) out.hint = r.json.hint;
      if (r.headers.get("idempotent-replayed") === "true") out.replayed = true;
      return jsonResult(out);
    },
  };

  const callAgentStatus = {
    name: "call_agent_status",
    label: "Call Agent Status",
    description:
      "Status of a call placed with call_agent: queued, dialing, in_progress, or final (completed, busy, no_answer, " +
      "failed, canceled), why it ended, the agent's report (summary, outcome, nextSteps, data) and its attempts.",
    parameters: {
      type: "object",
      additionalProperties: false,
      properties: {
        callId: { type: "string", description: "The callId call_agent returned" },
        includeTranscript: { type: "boolean", description: "Also return the transcript (default false)" },
      },
      required: ["callId"],
    },
    async execute(_toolCallId, params, signal) {
      const callId = callIdParam(params);
      const p = paramsObject(params);
      for (const k of Object.keys(p)) {
        if (k !== "callId" && k !== "includeTranscript") throw fieldError(k, "unknown field; call_agent_status takes callId, includeTranscript");
      }
      if (p.includeTranscript != null && typeof p.includeTranscript !== "boolean") {
        throw fieldError("includeTranscript", "expected true or false", p.includeTranscript);
      }
      const r = await request(cfg, "GET", `/v1/calls/${encodeURIComponent(callId)}`, { signal });
      if (r.status !== 200 || !r.json || typeof r.json.status !== "string") throw apiError(cfg, r, { callId });
      return jsonResult(summarize(r.json, p.includeTranscript === true));
    },
  };

  const callAgentHangup = {
    name: "call_agent_hangup",
    label: "Call Agent Hang Up",
    description:
      "End a call placed with call_agent: a ringing or queued call is canceled, a live one is hung up " +
      "(it then ends completed, endReason hung_up_by_api).",
    parameters: {
      type: "object",
      additionalProperties: false,
      properties: { callId: { type: "string", description: "The callId call_agent returned" } },
      required: ["callId"],
    },
    async execute(_toolCallId, params, signal) {
      const callId = callIdParam(params);
      for (const k of Object.keys(paramsObject(params))) {
        if (k !== "callId") throw fieldError(k, "unknown field; call_agent_hangup takes callId");
      }
      const r = await request(cfg, "POST", `/v1/calls/${encodeURIComponent(callId)}/hangup`, { signal });
      if (r.status !== 202 || !r.json || typeof r.json.status !== "string") throw apiError(cfg, r, { callId, method: "POST" });
      return jsonResult({ callId: r.json.callId ?? callId, status: r.json.status });
    },
  };

  return [callAgent, callAgentStatus, callAgentHangup];
}

export default {
  id: "callagent",
  name: "callagent",
  description: "Phone calls carried out by an AI voice agent, through a running callagent.",
  // Synchronous: Clawdbot ignores what an async register() does after it returns.
  register(api) {
    const cfg = resolveConfig(api.pluginConfig);
    // Tools that dial or hang up cost money and reach people: opt-in, as
    // Clawdbot's docs advise for side effects (agents' tools.allow).
    for (const tool of createTools(cfg)) {
      if (tool.name === "call_agent_status") api.registerTool(tool);
      else api.registerTool(tool, { optional: true });
    }
    api.logger?.info?.(`callagent: tools call_agent, call_agent_status, call_agent_hangup -> ${cfg.shown}`);
  },
};
