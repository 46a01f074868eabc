// Talking to a relay (PROTOCOL section 5): plain and signed requests, server info with its
// pinned key and key transitions, and errors turned into sentences.

import { canonicalJson } from "./canonical.js";
import { formatDate } from "./encoding.js";
import { describePublicKey, importPublicKey, sign, verify } from "./keys.js";

export const API = "/api/v1";
const SIGNATURE_VALIDITY = 120;

/** An error a person can read; `errno` and `transient` for the code that handles it. */
export class RelayError extends Error {
  constructor(message, { errno = null, status = null, transient = false, retryAfter = null } = {}) {
    super(message);
    this.errno = errno;
    this.status = status;
    this.transient = transient;
    this.retryAfter = retryAfter;
  }
}

const EXPLAIN = {
  100: "The relay did not understand the request",
  101: "The relay refused the key",
  103: "The relay could not decrypt the message",
  104: "The relay refused the message as malformed",
  105: "The relay refused the request's date. Check that this device's clock is right",
  106: "That address is not valid",
  110: "The relay refused this identity's signature",
  111: "The request expired before it arrived. Check that this device's clock is right",
  112: "The relay had already seen this request",
  120: "The access token for this contact is not valid any more (expired or revoked): ask them for a new invite",
  121: "This relay does not accept new accounts (or the registration token is wrong)",
  122: "Your relay does not deliver to that relay",
  130: "No such account on this relay (it may have been deleted)",
  131: "No such token (it may already be revoked)",
  132: "This relay does not offer that function (it may run an older version)",
  133: "This relay does not offer that function (it may run an older version)",
  140: "Too large for the relay",
  150: "The relay is busy (rate limit)",
  160: "The recipient's mailbox is full",
  180: "The relay's storage is unavailable right now; try again later",
  999: "The relay failed unexpectedly",
};

export function normaliseUrl(text) {
  let url;
  try {
    url = new URL(text.trim().includes("://") ? text.trim() : "https://" + text.trim());
  } catch {
    throw new RelayError(`"${text}" is not a web address (for example https://relay.example.org)`);
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") throw new RelayError("a relay address starts with https://");
  return url.origin + url.pathname.replace(/\/+$/, "");
}

export class Relay {
  /** `pinned`: the relay key fingerprint we trust, or null before the first contact. */
  constructor(url, pinned = null) {
    this.url = normaliseUrl(url);
    this.pinned = pinned;
    this.offset = 0; // server clock minus ours, in ms (from the Timestamp header)
    this.info = null;
    this.onRotation = null; // told (from, to) after a key transition was followed
  }

  get prefix() {
    return new URL(this.url).pathname.replace(/\/+$/, "");
  }

  async call(method, path, { query = null, body = null } = {}) {
    let response;
    try {
      response = await fetch(this.url + path + (query ? "?" + query : ""), {
        method,
        headers: body ? { "Content-Type": "application/json" } : {},
        body: body ? JSON.stringify(body) : undefined,
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
    } catch {
      throw new RelayError(`Cannot reach the relay at ${this.url}. Check the address and the network.`, { transient: true });
    }
    const stamp = response.headers.get("Timestamp");
    if (stamp && /^\d+$/.test(stamp)) this.offset = Number(stamp) * 1000 - Date.now();
    let obj = null;
    try {
      obj = await response.json();
    } catch {
      obj = null;
    }
    if (response.ok && obj && typeof obj === "object") return obj;
    const errno = obj && Number.isInteger(obj.errno) ? obj.errno : null;
    const retry = Number(response.headers.get("Retry-After")) || null;
    if (errno === null) {
      throw new RelayError(`The server at ${this.url} did not answer as a msgrelay relay does (HTTP ${response.status}).`,
        { status: response.status, transient: response.status >= 500 });
    }
    const detail = typeof obj.message === "string" ? obj.message : "";
    let text = EXPLAIN[errno] || `The relay refused the request (error ${errno})`;
    if (retry) text += `; trying again in ${retry} seconds is fine`;
    throw new RelayError(detail ? `${text} (${detail}).` : `${text}.`, {
      errno, status: response.status, retryAfter: retry,
      transient: [150, 160, 180, 999].includes(errno) || response.status >= 500,
    });
  }

  now() {
    return Date.now() + this.offset;
  }

  /** GET /server, checked against the pinned key (following signed key transitions). */
  async serverInfo(refresh = false) {
    if (this.info && !refresh) return this.info;
    const obj = await this.call("GET", `${API}/server`);
    if (typeof obj.name !== "string" || typeof obj.key !== "string") throw new RelayError(`${this.url} is not a msgrelay relay.`);
    const described = await describePublicKey(obj.key).catch(() => null);
    if (!described || described.fingerprint !== obj.fingerprint) {
      throw new RelayError(`The relay at ${this.url} sent a key that does not match its own fingerprint; nothing was sent.`);
    }
    if (this.pinned && this.pinned !== obj.fingerprint) {
      await this.followTransitions(obj);
    }
    const info = {
      ...obj,
      encryptKey: await importPublicKey(obj.key, "encrypt"),
      max_validity: Number.isInteger(obj.max_validity) ? obj.max_validity : 300,
    };
    this.info = info;
    return info;
  }

  /**
   * Follow key_transitions from the pinned fingerprint to the current one (PROTOCOL section 5).
   * Each step: SHA-256(from_key) is `from`, and `signature` verifies under from_key.
   */
  async followTransitions(obj) {
    const transitions = Array.isArray(obj.key_transitions) ? obj.key_transitions : [];
    let current = this.pinned;
    for (let step = 0; step <= transitions.length && current !== obj.fingerprint; step++) {
      const t = transitions.find((x) => x && x.from === current);
      if (!t) break;
      const ok = await this.checkTransition(obj.name, t).catch(() => false);
      if (!ok) break;
      current = t.to;
    }
    if (current !== obj.fingerprint) {
      const error = new RelayError(
        `THE RELAY'S KEY HAS CHANGED: ${this.url} now has key fingerprint ${obj.fingerprint}, but this app trusts ` +
        `${this.pinned}, and the relay shows no valid signed transition between them. Nothing was sent. ` +
        "Ask the relay's operator to confirm the new fingerprint before you accept it.");
      error.keyChange = { from: this.pinned, to: obj.fingerprint };
      throw error;
    }
    const from = this.pinned;
    this.pinned = obj.fingerprint;
    if (this.onRotation) await this.onRotation(from, obj.fingerprint);
  }

  async checkTransition(server, t) {
    if (typeof t.from_key !== "string" || typeof t.signature !== "string") return false;
    const described = await describePublicKey(t.from_key);
    if (described.fingerprint !== t.from) return false;
    const key = await importPublicKey(t.from_key, "verify");
    const base = canonicalJson({ type: "msgrelay-key-transition", server, from: t.from, to: t.to, date: t.date });
    return verify(key, t.signature, base);
  }

  /** A signed request for `identity` ({userId, signKey}) with the endpoint's own parameters. */
  async signed(identity, method, path, own = {}) {
    const info = await this.serverInfo();
    const params = {
      ...own,
      user_id: identity.userId,
      date: formatDate(this.now()),
      validity: Math.min(SIGNATURE_VALIDITY, info.max_validity),
    };
    const base = canonicalJson({ ...params, method, path: this.prefix + path, server: info.name });
    params.signature = await sign(identity.signKey, base);
    if (method === "GET") {
      const query = Object.entries(params).map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(String(v))}`).join("&");
      return this.call(method, path, { query });
    }
    return this.call(method, path, { body: params });
  }

  async register(keyPem, registrationToken) {
    const body = { key: keyPem };
    if (registrationToken) body.registration_token = registrationToken;
    return (await this.call("POST", `${API}/user`, { body })).user_id;
  }

  /** A user's key, refused unless it hashes to their user id. */
  async lookupUser(userId) {
    const obj = await this.call("GET", `${API}/user/${encodeURIComponent(userId)}`);
    const described = typeof obj.key === "string" ? await describePublicKey(obj.key).catch(() => null) : null;
    if (!described || described.userId !== userId) {
      throw new RelayError(`The relay at ${this.url} returned a key that does not belong to ${userId}; it was refused.`);
    }
    await importPublicKey(obj.key, "encrypt").catch((e) => {
      throw new RelayError(`The key of ${userId} cannot be used: ${e.message}.`);
    });
    return described;
  }
}
