// The console's only way out: the public HTTP API of this edge (the one /openapi.json describes).
// The API key lives in this module (memory) and, if the person asks, in this tab's sessionStorage;
// never in a URL, localStorage or a log line.

const STORED = "otpgate.console.key";

let apiKey = sessionStorage.getItem(STORED) || "";

export function signedIn() {
  return apiKey !== "";
}

export function setKey(key, rememberInTab) {
  apiKey = key;
  if (rememberInTab) sessionStorage.setItem(STORED, key);
  else sessionStorage.removeItem(STORED);
}

export function signOut() {
  apiKey = "";
  sessionStorage.removeItem(STORED);
}

/** A refusal of the API: google.rpc.Status with its details, read for people. */
export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const detail = (type) => (body?.details || []).find((d) => (d["@type"] || "").endsWith(type));
    super(body?.message || `the request failed (HTTP ${status})`);
    this.status = status;
    this.reason = detail("google.rpc.ErrorInfo")?.reason || "";
    this.retryAfter = retryAfter;
    // field path (snake_case, as the API names it) -> description
    this.violations = {};
    for (const v of detail("google.rpc.BadRequest")?.fieldViolations || []) {
      this.violations[v.field] = this.violations[v.field] ? `${this.violations[v.field]}; ${v.description}` : v.description;
    }
  }

  /** What to tell the person, in one sentence. */
  get summary() {
    if (this.status === 0) return "The edge cannot be reached. Check that otpgate is running, then retry.";
    if (this.status === 503) return `A service is unavailable right now; retry in ${this.retryAfter || "a few"} s.`;
    if (this.status === 429) return `Too many requests: ${this.message}. Retry in ${this.retryAfter || 1} s.`;
    const fields = Object.entries(this.violations);
    if (fields.length) return `Please fix: ${fields.map(([f, d]) => `${f} ${d}`).join("; ")}.`;
    return capitalise(this.message) + (this.reason ? ` (${this.reason})` : "");
  }
}

function capitalise(text) {
  return text ? text[0].toUpperCase() + text.slice(1) : text;
}

/** One call. `query` values that are empty are left out; the key goes only in the header. */
export async function call(method, path, { query, body, key } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, String(value));
  }
  const headers = { Accept: "application/json" };
  const useKey = key ?? apiKey;
  if (useKey) headers.Authorization = `Bearer ${useKey}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let reply;
  try {
    reply = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      referrerPolicy: "no-referrer",
    });
  } catch {
    throw new ApiError(0, { message: "the edge cannot be reached" }, 0);
  }
  const text = await reply.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = { message: text.trim() || `HTTP ${reply.status}` };
  }
  if (!reply.ok) throw new ApiError(reply.status, data, Number(reply.headers.get("Retry-After") || 0));
  return data;
}

export const get = (path, query, options) => call("GET", path, { ...options, query });
export const post = (path, body = {}, options) => call("POST", path, { ...options, body });
