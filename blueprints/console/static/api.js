// The gateway's JSON API, called with the signed-in key as a Bearer header.
//
// The key lives in this tab's sessionStorage only: never in a URL (page or API), a cookie,
// localStorage or the browser console. A 401 from any call signs the tab out.

const STORE = "vgw-console-session";

export class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param || null;
  }
}

export function session() {
  try {
    const raw = sessionStorage.getItem(STORE);
    const parsed = raw ? JSON.parse(raw) : null;
    return parsed && typeof parsed.key === "string" ? parsed : null;
  } catch {
    return null;
  }
}

export function saveSession(value) {
  sessionStorage.setItem(STORE, JSON.stringify(value));
}

export function forgetSession() {
  sessionStorage.removeItem(STORE);
}

let unauthorizedHandler = () => {};

/** What to do when the gateway refuses the key (401) mid-session. */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

function urlFor(path, query) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, String(value));
  }
  return url;
}

async function send(key, path, {method = "GET", query, body} = {}) {
  const headers = {Authorization: `Bearer ${key}`, Accept: "application/json"};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(urlFor(path, query), {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit", cache: "no-store", redirect: "error", referrerPolicy: "no-referrer",
    });
  } catch {
    throw new ApiError(0, "The gateway could not be reached.");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = data && typeof data === "object" && data.error ? data.error : {};
    const message = typeof error.message === "string" ? error.message : `HTTP ${response.status}`;
    throw new ApiError(response.status, message, typeof error.param === "string" ? error.param : null);
  }
  return data;
}

/** Sign-in: who is this key? -> {role: "master"|"key", key: token|null, info}. Nothing is stored. */
export function whoIs(key) {
  return send(key, "/key/info");
}

/** A call as the signed-in key; a 401 signs the tab out (and still rejects). */
export async function api(path, options) {
  const current = session();
  if (!current) {
    unauthorizedHandler("Signed out.");
    throw new ApiError(401, "Signed out.");
  }
  try {
    return await send(current.key, path, options);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      unauthorizedHandler(`The gateway refused the key (${error.message}): signed out.`);
    }
    throw error;
  }
}

export const get = (path, query) => api(path, {query});
export const post = (path, body) => api(path, {method: "POST", body});

/** An error as one line for the page (the field it names first, when it names one). */
export function describe(error) {
  if (error instanceof ApiError) {
    return error.status ? `${error.message} (HTTP ${error.status})` : error.message;
  }
  return error && error.message ? error.message : `Unexpected error: ${error}`;
}

/**
 * A filter value that may be a key or its token: a plaintext key (sk-…) is turned into its
 * token (sha256 hex) here, so it never travels in a query string. Returns null when it cannot
 * be (no WebCrypto outside a secure context).
 */
export async function tokenOf(value) {
  const text = String(value || "").trim();
  if (!text.startsWith("sk-")) return text;
  if (!window.crypto || !window.crypto.subtle) return null;
  const digest = await window.crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

// The `key` filter of a query: a typed key goes as its token (never in a query string);
// undefined when empty; an error when the key cannot be hashed here.
export async function keyFilter(value) {
  if (!value) return undefined;
  const token = await tokenOf(value);
  if (token === null) throw new Error("Give the key's token: this page is not a secure context, so a key cannot be hashed here.");
  return token || undefined;
}
