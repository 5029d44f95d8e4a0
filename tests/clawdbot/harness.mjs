// A stand-in for the Clawdbot host, for tests/test_clawdbot_plugin.lua: it
// loads a plugin folder the way Clawdbot's loader does (src/plugins/
// discovery.ts, manifest.ts, loader.ts; tools through
// src/agents/pi-tool-definition-adapter.ts) and runs tool calls on it.
//
//   node harness.mjs PLUGIN_DIR PLAN_JSON
//
// PLAN_JSON: {"config": {...plugins.entries.<id>.config},
//             "steps": [{"tool", "toolCallId", "params", "abortAfterMs"?}, ...]}
// abortAfterMs: the host cancels the tool call then (the run was stopped),
// through the signal execute gets.
// Prints one JSON line: {ok, id, tools, logs, steps: [{tool, toolCallId,
// isError, details, text, error?, ms}]}, or {ok: false, error} when the plugin
// would not load. Exit 0 either way (a crash is a non-zero exit).
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [pluginDir, planText] = process.argv.slice(2);
const logs = [];

function out(v) {
  process.stdout.write(JSON.stringify(v) + "\n");
}

function fail(error) {
  out({ ok: false, error, logs });
  process.exit(0);
}

function readJson(file) {
  try {
    return JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (err) {
    fail(`${file}: ${err.message}`);
  }
}

// The subset of JSON Schema a plugin manifest's configSchema uses here;
// Clawdbot validates with ajv (src/plugins/schema-validator.ts): no defaults
// are filled in, so the plugin gets the config as written.
function validate(schema, value, at = "<root>") {
  const errs = [];
  const t = schema.type;
  const typeOk =
    t === undefined ||
    (t === "object" && value !== null && typeof value === "object" && !Array.isArray(value)) ||
    (t === "string" && typeof value === "string") ||
    (t === "integer" && Number.isInteger(value)) ||
    (t === "number" && typeof value === "number") ||
    (t === "boolean" && typeof value === "boolean");
  if (!typeOk) return [`${at}: must be ${t}`];
  if (t === "object") {
    for (const [k, v] of Object.entries(value)) {
      const sub = schema.properties?.[k];
      if (!sub) {
        // ajv names the object, not the key (instancePath), as Clawdbot prints it.
        if (schema.additionalProperties === false) errs.push(`${at}: must NOT have additional properties`);
        continue;
      }
      errs.push(...validate(sub, v, at === "<root>" ? k : `${at}.${k}`));
    }
  }
  if (typeof value === "string") {
    if (schema.minLength !== undefined && value.length < schema.minLength) errs.push(`${at}: must NOT have fewer than ${schema.minLength} characters`);
    if (schema.pattern !== undefined && !new RegExp(schema.pattern, "u").test(value)) errs.push(`${at}: must match pattern "${schema.pattern}"`);
  }
  if (typeof value === "number") {
    if (schema.minimum !== undefined && value < schema.minimum) errs.push(`${at}: must be >= ${schema.minimum}`);
    if (schema.maximum !== undefined && value > schema.maximum) errs.push(`${at}: must be <= ${schema.maximum}`);
  }
  return errs;
}

const plan = JSON.parse(planText);
const pkg = readJson(path.join(pluginDir, "package.json"));
// discovery.ts: package.json "moltbot" (or the legacy "clawdbot") .extensions.
const meta = pkg.moltbot ?? pkg.clawdbot;
if (!meta || !Array.isArray(meta.extensions) || meta.extensions.length === 0) fail("package.json has no clawdbot.extensions");
// manifest.ts: moltbot.plugin.json, else the legacy clawdbot.plugin.json; id and configSchema required.
const manifestFile = ["moltbot.plugin.json", "clawdbot.plugin.json"].map((f) => path.join(pluginDir, f)).find((f) => fs.existsSync(f));
if (!manifestFile) fail("no clawdbot.plugin.json");
const manifest = readJson(manifestFile);
if (typeof manifest.id !== "string" || !manifest.id.trim()) fail("plugin manifest requires id");
if (!manifest.configSchema || typeof manifest.configSchema !== "object") fail("plugin manifest requires configSchema");
// discovery.ts/manifest-registry.ts: a single-entry package's id hint is its unscoped name.
const idHint = pkg.name.split("/").pop();
if (meta.extensions.length === 1 && idHint !== manifest.id) logs.push(`warn: plugin id mismatch (manifest uses "${manifest.id}", entry hints "${idHint}")`);

const config = plan.config ?? {};
const errors = validate(manifest.configSchema, config);
if (errors.length) fail(`invalid config: ${errors.join(", ")}`);

// loader.ts resolvePluginModuleExport: the default export, a function or {register|activate}.
const mod = await import(pathToFileURL(path.resolve(pluginDir, meta.extensions[0])).href);
const exported = mod && typeof mod === "object" && "default" in mod ? mod.default : mod;
const register = typeof exported === "function" ? exported : (exported?.register ?? exported?.activate);
if (typeof register !== "function") fail("plugin export missing register/activate");

const tools = [];
const api = {
  id: manifest.id,
  name: manifest.name ?? manifest.id,
  version: manifest.version,
  description: manifest.description,
  source: meta.extensions[0],
  config: {},
  pluginConfig: config,
  runtime: {},
  logger: {
    debug: (m) => logs.push(`debug: ${m}`),
    info: (m) => logs.push(`info: ${m}`),
    warn: (m) => logs.push(`warn: ${m}`),
    error: (m) => logs.push(`error: ${m}`),
  },
  registerTool(tool, opts) {
    // A tool, or a factory of tools given the agent's context (tools.ts).
    const made = typeof tool === "function" ? tool({ sandboxed: false, agentId: "main", sessionKey: "main" }) : tool;
    for (const t of [made].flat().filter(Boolean)) tools.push({ tool: t, optional: Boolean(opts?.optional) });
  },
  registerHook() {},
  registerHttpHandler() {},
  registerHttpRoute() {},
  registerChannel() {},
  registerGatewayMethod() {},
  registerCli() {},
  registerService() {},
  registerProvider() {},
  registerCommand() {},
  resolvePath: (p) => p,
  on() {},
};

try {
  const r = register(api);
  if (r && typeof r.then === "function") logs.push("warn: plugin register returned a promise; async registration is ignored");
} catch (err) {
  fail(`plugin failed during register: ${String(err)}`);
}

for (const { tool } of tools) {
  if (typeof tool.name !== "string" || typeof tool.execute !== "function" || tool.parameters?.type !== "object") {
    fail(`tool ${tool.name}: needs a name, an execute function and an object JSON Schema as parameters`);
  }
}

// pi-ai's validateToolArguments, which an agent's tool call goes through
// before execute: ajv with coerceTypes, which rewrites a scalar to the type
// the schema's property has (null -> "" for a string, false for a boolean;
// 5 -> "5"; "true" -> true). Only the rewriting: where ajv would refuse a
// value (an array for an object), the tool is given it, as by the Gateway's
// POST /tools/invoke, which validates nothing.
function coerce(schema, params) {
  if (!params || typeof params !== "object" || Array.isArray(params)) return params;
  const out = { ...params };
  for (const [k, v] of Object.entries(out)) {
    const t = schema.properties?.[k]?.type;
    if (t === "string" && (v === null || typeof v === "number" || typeof v === "boolean")) out[k] = v === null ? "" : String(v);
    else if (t === "boolean" && (v === null || v === 0 || v === "false")) out[k] = false;
    else if (t === "boolean" && (v === 1 || v === "true")) out[k] = true;
  }
  return out;
}

// pi-tool-definition-adapter.ts: execute(toolCallId, params, signal, onUpdate);
// a throw becomes jsonResult({status: "error", tool, error: message}).
const steps = [];
// (An empty Lua table is encoded as {}: no steps.)
for (const step of Array.isArray(plan.steps) ? plan.steps : []) {
  const entry = tools.find((t) => t.tool.name === step.tool);
  if (!entry) fail(`no tool named ${step.tool}`);
  let result, isError = false, error;
  const ctl = new AbortController();
  const cancel = step.abortAfterMs === undefined ? null : setTimeout(() => ctl.abort(), step.abortAfterMs);
  const t0 = performance.now();
  try {
    result = await entry.tool.execute(step.toolCallId ?? "call_1", coerce(entry.tool.parameters, step.params ?? {}), ctl.signal, () => {});
  } catch (err) {
    isError = true;
    error = err instanceof Error && err.message.trim() ? err.message : String(err);
    const payload = { status: "error", tool: step.tool, error };
    result = { content: [{ type: "text", text: JSON.stringify(payload, null, 2) }], details: payload };
  }
  const ms = Math.round(performance.now() - t0);
  if (cancel) clearTimeout(cancel);
  const content = result?.content;
  if (!Array.isArray(content) || content.length === 0 || content.some((c) => c.type !== "text" || typeof c.text !== "string")) {
    fail(`tool ${step.tool}: result content must be an array of {type: "text", text}`);
  }
  steps.push({ tool: step.tool, toolCallId: step.toolCallId, isError, error, details: result.details ?? null, text: content[0].text, ms });
}

out({
  ok: true,
  id: manifest.id,
  tools: tools.map((t) => t.tool.name),
  optional: tools.filter((t) => t.optional).map((t) => t.tool.name),
  logs,
  steps,
});
