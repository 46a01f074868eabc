// Message objects (PROTOCOL section 6, client convention) and invites, exactly as
// msgrelay-client makes and checks them (msgrelay/client/messages.py and invite.py).

import { canonicalJson } from "./canonical.js";
import { b64decode, formatDate, hex } from "./encoding.js";
import { describePublicKey, importPublicKey, sha256, sign, verify } from "./keys.js";

export const RAW_DATA = 1;
export const RAW_MESSAGE = 2;
export const TOKEN_REQUEST = 3;

const USER_ID = /^[a-z2-7]{32}$/;
const LABEL = "(?!-)[A-Za-z0-9-]{1,63}(?<!-)";
const SERVER_NAME = new RegExp(`^${LABEL}(?:\\.${LABEL})*(?::(\\d{1,5}))?$`);

/** {userId, server} of a bare or qualified address; throws with a reason. */
export function parseAddress(text) {
  const at = text.indexOf("@");
  const userId = at < 0 ? text : text.slice(0, at);
  const server = at < 0 ? null : text.slice(at + 1);
  if (!USER_ID.test(userId)) throw new Error("the address does not start with a 32-character user id");
  if (server !== null) {
    const match = SERVER_NAME.exec(server);
    if (!match || server.length > 261 || (match[1] && (Number(match[1]) < 1 || Number(match[1]) > 65535))) {
      throw new Error(`"${server}" is not a relay name`);
    }
  }
  return { userId, server: server === null ? null : server.toLowerCase() };
}

export async function messageRef(message) {
  return hex(await sha256(canonicalJson(message))).slice(0, 32);
}

/** A signed message object from `me` ({address, publicPem, signKey}) to the address `to`. */
export async function buildMessage(me, to, dataType, data, now) {
  const obj = { from: me.address, to, key: me.publicPem, data_type: dataType, data, date: formatDate(now) };
  obj.signature = await sign(me.signKey, canonicalJson(obj));
  return obj;
}

export const textData = (content, lastId, name) => ({ last_id: lastId || null, name: name || "", content });
export const tokenRequestData = (address, token) => ({ user_id: address, token });

function reject(reason) {
  const error = new Error(reason);
  error.rejected = true;
  throw error;
}

function checkData(type, data, senderId) {
  if (!Number.isInteger(type)) reject(`data_type ${JSON.stringify(type)} is not an integer`);
  if (type === RAW_DATA) {
    try {
      b64decode(data);
    } catch {
      reject("the file is not standard base64");
    }
  } else if (type === RAW_MESSAGE) {
    if (!data || typeof data !== "object" || typeof data.content !== "string") reject("the text message has no content");
    if (typeof (data.name ?? "") !== "string" || !(data.last_id === null || data.last_id === undefined || typeof data.last_id === "string")) {
      reject("the text message's name or last_id has the wrong type");
    }
  } else if (type === TOKEN_REQUEST) {
    if (!data || typeof data !== "object" || typeof data.token !== "string" || !data.token) reject("the token request has no token");
    let answer;
    try {
      answer = parseAddress(String(data.user_id));
    } catch (e) {
      reject(`the token request's address is invalid: ${e.message}`);
    }
    if (answer.userId !== senderId || answer.server === null) reject("the token request asks to answer someone other than its signer");
  } else {
    reject(`unknown data_type ${type}`);
  }
}

/**
 * Check a decrypted message object as msgrelay-client does: signature, `to` is us, `from`
 * matches the signing key, date and data. Returns {senderId, senderAddress, keyPem,
 * fingerprint, type, data, date, ref}; throws an Error with `rejected` set otherwise.
 */
export async function verifyMessage(obj, me) {
  if (!obj || typeof obj !== "object" || Array.isArray(obj)) reject("it is not a message object");
  for (const name of ["to", "key", "data_type", "data", "date", "signature"]) {
    if (!(name in obj)) reject(`the message has no ${name}`);
  }
  if (typeof obj.key !== "string" || typeof obj.signature !== "string" || typeof obj.to !== "string") {
    reject("the message's key, to or signature is not a string");
  }
  let described;
  let key;
  try {
    described = await describePublicKey(obj.key);
    key = await importPublicKey(obj.key, "verify");
  } catch (e) {
    reject(`the sender's key is unusable: ${e.message}`);
  }
  const unsigned = { ...obj };
  delete unsigned.signature;
  let base;
  try {
    base = canonicalJson(unsigned);
  } catch (e) {
    reject(`the message cannot be checked: ${e.message}`);
  }
  if (!(await verify(key, obj.signature, base))) reject("the signature does not verify");
  let senderAddress = null;
  if (obj.from !== undefined && obj.from !== null) {
    let parsed;
    try {
      parsed = parseAddress(String(obj.from));
    } catch {
      reject("the message's from is not an address");
    }
    if (parsed.userId !== described.userId) reject(`the message claims to be from ${parsed.userId} but is signed by the key of ${described.userId}`);
    senderAddress = parsed.server ? `${parsed.userId}@${parsed.server}` : parsed.userId;
  }
  let to;
  try {
    to = parseAddress(obj.to);
  } catch {
    reject("the message's to is not an address");
  }
  if (to.userId !== me.userId || (to.server !== null && to.server !== me.serverName.toLowerCase())) {
    reject(`the message is addressed to ${obj.to}, not to you: possibly passed on by someone else`);
  }
  if (typeof obj.date !== "string" || Number.isNaN(Date.parse(obj.date))) reject("the message's date is invalid");
  checkData(obj.data_type, obj.data, described.userId);
  return {
    senderId: described.userId, senderAddress, keyPem: obj.key, fingerprint: described.fingerprint,
    type: obj.data_type, data: obj.data, date: obj.date, ref: await messageRef(obj),
  };
}

// -- invites: msgrelay:<user_id>@<server_name>?token=<token> --------------------------------

export const INVITE_EXAMPLE = "msgrelay:<32-character user id>@<relay name>?token=<token>";
const TOKEN = /^[A-Za-z0-9._~-]{16,1024}$/;

export function formatInvite(address, token) {
  return `msgrelay:${address}?token=${encodeURIComponent(token)}`;
}

/** {address, userId, server, token} of an invite line; throws a sentence. */
export function parseInvite(text) {
  const line = text.trim();
  if (!line.toLowerCase().startsWith("msgrelay:")) throw new Error(`This is not an invite: an invite looks like ${INVITE_EXAMPLE}`);
  const rest = line.slice("msgrelay:".length);
  const q = rest.indexOf("?");
  if (q < 0) throw new Error(`The invite has no ?token=…; an invite looks like ${INVITE_EXAMPLE}`);
  let parsed;
  try {
    parsed = parseAddress(rest.slice(0, q));
  } catch (e) {
    throw new Error(`The invite's address is wrong: ${e.message}`);
  }
  if (!parsed.server) throw new Error("The invite's address names no relay");
  const params = new URLSearchParams(rest.slice(q + 1));
  const tokens = params.getAll("token");
  if (tokens.length !== 1 || !TOKEN.test(tokens[0])) throw new Error("The invite must carry one token of 16 or more URL-safe characters");
  return { address: `${parsed.userId}@${parsed.server}`, userId: parsed.userId, server: parsed.server, token: tokens[0] };
}
