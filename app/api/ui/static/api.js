// The HTTP API as the page uses it: JSON calls and server-sent events, each carrying the API key.
// EventSource cannot send headers, so event streams are read with fetch() and parsed here.

const KEY_ITEM = "detox.apiKey";

export function getKey() {
  try {
    return localStorage.getItem(KEY_ITEM) || "";
  } catch {
    return "";
  }
}

export function setKey(key) {
  try {
    if (key) localStorage.setItem(KEY_ITEM, key);
    else localStorage.removeItem(KEY_ITEM);
  } catch {
    // storage refused (private mode): the key lives for this page only
  }
}

/** The server's error envelope ({message, type, param, code}) with the HTTP status. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.type = error?.type ?? null;
    this.param = error?.param ?? null;
    this.code = error?.code ?? null;
  }
}

function headers(extra) {
  const all = { Accept: "application/json", ...extra };
  const key = getKey();
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

async function failure(response) {
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: a proxy's page, say
  }
  return new ApiError(response.status, body?.error ?? { message: text || response.statusText });
}

/** GET (or `method`) a /v1 path; `body` is sent as JSON. Resolves to the parsed JSON answer. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers(), cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

/**
 * An incremental parser of the text/event-stream format: feed it chunks, it calls
 * onEvent(name, data) per dispatched event (comments and `id:`/`retry:` are ignored).
 */
export function sseParser(onEvent) {
  let buffer = "";
  let name = "";
  let data = [];
  function line(text) {
    if (text.endsWith("\r")) text = text.slice(0, -1);
    if (text === "") {
      if (data.length) onEvent(name || "message", data.join("\n"));
      name = "";
      data = [];
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return {
    push(chunk) {
      buffer += chunk;
      const lines = buffer.split("\n");
      buffer = lines.pop();
      lines.forEach(line);
    },
    end() {
      if (buffer) line(buffer);
      buffer = "";
      line("");
    },
  };
}

/** Read the event stream at `path` until it ends; onEvent(name, data) per event. */
export async function events(path, onEvent, { signal } = {}) {
  const response = await fetch(path, {
    signal,
    cache: "no-store",
    headers: headers({ Accept: "text/event-stream" }),
  });
  if (!response.ok) throw await failure(response);
  const parser = sseParser(onEvent);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
    parser.end();
  } finally {
    reader.releaseLock();
  }
}
