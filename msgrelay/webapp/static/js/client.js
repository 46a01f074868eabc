// The client: one identity at one relay, its contacts and messages, in this browser.
// Mirrors msgrelay-client (msgrelay/client/sending.py and receiving.py) so that both
// interoperate: signed message objects, a type 3 token request before the first message
// to someone who cannot yet write back, pinned contact keys, store-then-acknowledge.

import { canonicalJson } from "./canonical.js";
import { b64encode, randomId, utf8 } from "./encoding.js";
import { decryptPkcs8, encryptPkcs8, generatePkcs8, identityKeys, importPublicKey, openJson, seal } from "./keys.js";
import { RAW_DATA, RAW_MESSAGE, TOKEN_REQUEST, buildMessage, formatInvite, messageRef, parseInvite } from "./messages.js";
import { textData, tokenRequestData, verifyMessage } from "./messages.js";
import { API, Relay, RelayError } from "./relay.js";
import * as store from "./store.js";

const RECENT_REFS = 200;
const MAX_ROUNDS = 20;
export const CONTACT_NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/;

export class UserError extends Error {}

function checkName(name) {
  if (!CONTACT_NAME.test(name)) throw new UserError("A contact name is 1 to 64 letters, digits, '.', '_' or '-'.");
  return name;
}

function remember(contact, ref) {
  contact.lastId = ref;
  contact.recentRefs = [...(contact.recentRefs || []), ref].slice(-RECENT_REFS);
}

export class Client {
  constructor(identity) {
    this.identity = identity;
    this.relay = this.makeRelay();
  }

  /** The client of the identity stored in this browser, or null. */
  static async load() {
    const identity = await store.get("kv", "identity");
    return identity ? new Client(identity) : null;
  }

  makeRelay() {
    const relay = new Relay(this.identity.relayUrl, this.identity.serverFingerprint);
    relay.onRotation = async (from, to) => {
      this.identity.serverFingerprint = to;
      await store.put("kv", this.identity, "identity");
      if (this.onNotice) this.onNotice(`The relay rotated its key (${from.slice(0, 16)}… to ${to.slice(0, 16)}…); the app checked the relay's signed key transition and now trusts the new key.`);
    };
    return relay;
  }

  get address() {
    return `${this.identity.userId}@${this.identity.serverName}`;
  }

  /** What message building and checking need to know about us. */
  get me() {
    const id = this.identity;
    return { address: this.address, publicPem: id.publicPem, signKey: id.signKey, userId: id.userId, serverName: id.serverName };
  }

  /**
   * Create (from new or imported PKCS#8 bytes) and register an identity. The PKCS#8 bytes
   * are imported as non-extractable keys and dropped; only the passphrase-encrypted identity
   * file is kept, so that it can be downloaded again.
   */
  static async setUp({ relayUrl, displayName = "", passphrase, registrationToken = "", pkcs8 = null, backup = null }) {
    const relay = new Relay(relayUrl);
    const info = await relay.serverInfo();
    if (!pkcs8) pkcs8 = await generatePkcs8();
    const keys = await identityKeys(pkcs8);
    if (!backup) backup = await encryptPkcs8(pkcs8, passphrase);
    pkcs8.fill(0);
    const userId = await relay.register(keys.pem, registrationToken);
    if (userId !== keys.userId) throw new UserError(`The relay registered the key as ${userId}, but its user id is ${keys.userId}.`);
    const identity = {
      signKey: keys.signKey, decryptKey: keys.decryptKey, publicPem: keys.pem, userId, fingerprint: keys.fingerprint,
      relayUrl: relay.url, serverName: info.name, serverFingerprint: info.fingerprint, displayName,
      backup, created: new Date().toISOString(), invites: {},
    };
    await store.put("kv", identity, "identity");
    return new Client(identity);
  }

  static async importFile({ fileText, passphrase, ...rest }) {
    const pkcs8 = await decryptPkcs8(fileText, passphrase).catch((e) => { throw new UserError(e.message); });
    const backup = fileText.includes("ENCRYPTED PRIVATE KEY") ? fileText : await encryptPkcs8(pkcs8.slice(), passphrase);
    return Client.setUp({ ...rest, passphrase, pkcs8, backup });
  }

  async saveIdentity() {
    await store.put("kv", this.identity, "identity");
  }

  // -- contacts ---------------------------------------------------------------------------

  async contacts() {
    return (await store.all("contacts")).sort((a, b) => a.name.localeCompare(b.name));
  }

  async contact(name) {
    const found = await store.get("contacts", name);
    if (!found) throw new UserError(`There is no contact named ${name}.`);
    return found;
  }

  relayFor(server, relayUrl) {
    if (server === this.identity.serverName.toLowerCase() && !relayUrl) return this.relay;
    return new Relay(relayUrl || `https://${server}`);
  }

  /**
   * Add a contact from an invite, pinning the key their relay gives for the user id (it must
   * hash to it). An invite for a different key under an existing name is held as a pending
   * key change: sending to that contact is blocked until the person confirms it.
   */
  async addContact(name, inviteText, relayUrl = "") {
    checkName(name);
    let invite;
    try {
      invite = parseInvite(inviteText);
    } catch (e) {
      throw new UserError(e.message);
    }
    if (invite.userId === this.identity.userId) throw new UserError("That is your own invite.");
    const key = await this.relayFor(invite.server, relayUrl || null).lookupUser(invite.userId);
    const contacts = await this.contacts();
    const existing = contacts.find((c) => c.name === name);
    const same = contacts.find((c) => c.address.split("@")[0] === invite.userId);
    if (same && same.name !== name) throw new UserError(`${invite.address} is already your contact ${same.name}.`);
    const entry = { address: invite.address, keyPem: key.pem, fingerprint: key.fingerprint, token: invite.token, relayUrl: relayUrl || null };
    if (existing && existing.address.split("@")[0] !== invite.userId) {
      existing.pending = { ...entry, reason: `This invite is for a different key (${key.fingerprint}) than the one pinned for ${name} (${existing.fingerprint}).` };
      await store.put("contacts", existing);
      return { status: "pending", contact: existing };
    }
    if (existing) {
      Object.assign(existing, { token: invite.token, address: invite.address, relayUrl: relayUrl || null });
      existing.introSent = existing.introSent && existing.hasWritten;
      await store.put("contacts", existing);
      return { status: "updated", contact: existing };
    }
    const contact = { name, ...entry, myTokenId: null, myToken: null, introSent: false, hasWritten: false, lastId: null,
      recentRefs: [], added: new Date().toISOString(), pending: null };
    await store.put("contacts", contact);
    return { status: "added", contact };
  }

  /** Accept a pending key change: the new key, address and token replace the old ones. */
  async confirmKey(name) {
    const contact = await this.contact(name);
    if (!contact.pending) return contact;
    const p = contact.pending;
    Object.assign(contact, { address: p.address, keyPem: p.keyPem, fingerprint: p.fingerprint, token: p.token || contact.token,
      relayUrl: p.relayUrl || null, pending: null, introSent: false, hasWritten: false, myTokenId: null, myToken: null });
    await store.put("contacts", contact);
    return contact;
  }

  async keepOldKey(name) {
    const contact = await this.contact(name);
    contact.pending = null;
    await store.put("contacts", contact);
  }

  async removeContact(name) {
    const contact = await this.contact(name);
    if (contact.myTokenId) {
      await this.revokeToken(contact.myTokenId).catch((e) => { if (e.errno !== 131) throw e; });
    }
    await store.remove("contacts", name);
  }

  // -- tokens, invites, account -----------------------------------------------------------

  async mintToken(label, expiresIn) {
    const own = { label };
    if (expiresIn !== undefined && expiresIn !== null) own.expires_in = expiresIn;
    return this.relay.signed(this.identity, "POST", `${API}/token`, own);
  }

  /** An invite line, as `msgrelay-client invite` prints it; `forName` names them when they write. */
  async makeInvite(forName = "") {
    if (forName) checkName(forName);
    const minted = await this.mintToken(forName ? `invite for ${forName}` : "invite");
    this.identity.invites = { ...(this.identity.invites || {}), [minted.id]: { for: forName || null, created: new Date().toISOString() } };
    await this.saveIdentity();
    return formatInvite(this.address, minted.token);
  }

  async tokens() {
    return (await this.relay.signed(this.identity, "GET", `${API}/token`)).tokens || [];
  }

  async revokeToken(id) {
    return (await this.relay.signed(this.identity, "DELETE", `${API}/token`, { id })).revoked;
  }

  /** The account as the relay sees it (signed GET /user, PROTOCOL revision 2). */
  async account() {
    return this.relay.signed(this.identity, "GET", `${API}/user`);
  }

  /** Set (an https URL) or clear ("") the push endpoint with the signed PUT /user. */
  async setPushEndpoint(url) {
    await this.relay.signed(this.identity, "PUT", `${API}/user`, { push_endpoint: url });
  }

  async deleteAccount() {
    await this.relay.signed(this.identity, "DELETE", `${API}/user`);
    await store.clearAll();
  }

  /** Trust a relay key the person confirmed out of band. */
  async trustRelayKey(fingerprint) {
    this.identity.serverFingerprint = fingerprint;
    await this.saveIdentity();
    this.relay = this.makeRelay();
  }

  // -- sending ----------------------------------------------------------------------------

  async postPacket(contact, message) {
    const info = await this.relay.serverInfo();
    const recipientKey = await importPublicKey(contact.keyPem, "encrypt");
    const packet = { id: randomId(), user_id: contact.address, token: contact.token };
    Object.assign(packet, await seal(recipientKey, canonicalJson(message)));
    const body = await seal(info.encryptKey, utf8(JSON.stringify(packet)));
    const size = utf8(JSON.stringify(body)).length;
    if (info.max_body_bytes && size > info.max_body_bytes) {
      throw new UserError(`Too large for relay ${info.name}: the request would be ${size} bytes and it accepts at most ${info.max_body_bytes} (files travel base64-encoded three times).`);
    }
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.relay.call("POST", `${API}/message`, { body });
      } catch (e) {
        if (!(e instanceof RelayError) || e.errno !== null || !e.transient || attempt >= 2) throw e;
      }
    }
  }

  /** Before the first message to someone who cannot write back: a type 3 with a token for them. */
  async introduce(contact) {
    if (contact.introSent || contact.hasWritten) return;
    if (!contact.myToken) {
      let minted;
      try {
        minted = await this.mintToken(`contact ${contact.name}`, 0);
      } catch (e) {
        if (e.errno !== 100) throw e;
        minted = await this.mintToken(`contact ${contact.name}`);
      }
      contact.myToken = minted.token;
      contact.myTokenId = minted.id;
      await store.put("contacts", contact);
    }
    const message = await buildMessage(this.me, contact.address, TOKEN_REQUEST, tokenRequestData(this.address, contact.myToken), this.relay.now());
    await this.postPacket(contact, message);
    contact.introSent = true;
    await store.put("contacts", contact);
  }

  async send(name, kind, content, fileName = "") {
    const contact = await this.contact(name);
    if (contact.pending) {
      throw new UserError(`The key of ${name} has changed. Sending is blocked until you confirm the new key on the Contacts page (compare fingerprints with ${name} first).`);
    }
    if (!contact.token) throw new UserError(`You have no access token for ${name}: they must send you an invite, or write to you first.`);
    await this.relay.serverInfo();
    let message;
    if (kind === "text") {
      message = await buildMessage(this.me, contact.address, RAW_MESSAGE, textData(content, contact.lastId, this.identity.displayName), this.relay.now());
    } else {
      message = await buildMessage(this.me, contact.address, RAW_DATA, b64encode(content), this.relay.now());
    }
    await this.introduce(contact);
    const answer = await this.postPacket(contact, message);
    const ref = await messageRef(message);
    remember(contact, ref);
    const record = {
      id: `out:${answer.message_id}:${ref}`, direction: "out", contact: name, type: kind, status: "sent",
      text: kind === "text" ? content : "", fileName, size: kind === "file" ? content.length : 0,
      fileData: kind === "file" ? message.data : null, date: message.date, ref, seq: Date.now(),
    };
    await store.write(["contacts", "messages"], (s) => {
      s.contacts.put(contact);
      s.messages.put(record);
    });
    return record;
  }

  // -- receiving --------------------------------------------------------------------------

  async messages(name = null) {
    const all = (await store.all("messages")).sort((a, b) => a.seq - b.seq);
    return name ? all.filter((m) => m.contact === name) : all;
  }

  pickName(contacts, tokenId, userId) {
    const wanted = tokenId && this.identity.invites && this.identity.invites[tokenId] ? this.identity.invites[tokenId].for : null;
    const taken = new Set(contacts.map((c) => c.name));
    const candidates = (wanted && CONTACT_NAME.test(wanted) ? [wanted] : []).concat([`user-${userId.slice(0, 8)}`]);
    for (let n = 2; n < 100; n++) candidates.push(`user-${userId.slice(0, 8)}-${n}`);
    return candidates.find((c) => !taken.has(c));
  }

  /** Verify one server message object and decide what it means; returns the record and changed contacts. */
  async accept(sm, contacts) {
    const base = { id: `in:${sm.id}`, direction: "in", received: sm.received || null, seq: Date.now() };
    let v;
    try {
      v = await verifyMessage(await openJson(this.identity.decryptKey, sm).catch((e) => {
        const err = new Error(`it does not decrypt: ${e.message}`);
        err.rejected = true;
        throw err;
      }), this.me);
    } catch (e) {
      if (!e.rejected) throw e;
      return { record: { ...base, status: "rejected", type: "rejected", contact: null, detail: e.message }, changed: [] };
    }
    const changed = [];
    const owner = contacts.find((c) => sm.token && c.myTokenId === sm.token);
    let contact = contacts.find((c) => c.address.split("@")[0] === v.senderId) || null;
    if (owner && owner.address.split("@")[0] !== v.senderId) {
      const detail = `KEY MISMATCH: this message came with the token you gave ${owner.name}, but it is signed by another key (fingerprint ${v.fingerprint}); ${owner.name} is pinned to ${owner.fingerprint}.`;
      if (v.type === TOKEN_REQUEST) {
        owner.pending = { address: v.data.user_id, keyPem: v.keyPem, fingerprint: v.fingerprint, token: v.data.token, relayUrl: null, reason: detail };
        changed.push(owner);
      }
      return { record: { ...base, status: "rejected", type: "rejected", contact: owner.name, detail }, changed };
    }
    let isNew = false;
    if (v.type === TOKEN_REQUEST) {
      const answer = v.data.user_id.toLowerCase();
      if (!contact) {
        contact = { name: this.pickName(contacts, sm.token, v.senderId), address: answer, keyPem: v.keyPem, fingerprint: v.fingerprint,
          token: null, relayUrl: null, myTokenId: null, myToken: null, introSent: true, hasWritten: false, lastId: null,
          recentRefs: [], added: new Date().toISOString(), pending: null };
        contacts.push(contact);
        isNew = true;
      }
      if (contact.address !== answer) Object.assign(contact, { address: answer, relayUrl: null });
      contact.token = v.data.token;
    }
    if (contact) {
      contact.hasWritten = true;
      changed.push(contact);
    }
    const record = { ...base, status: "verified", contact: contact ? contact.name : null, from: v.senderAddress || v.senderId,
      fingerprint: v.fingerprint, date: v.date, ref: v.ref, newContact: isNew };
    if (v.type === RAW_MESSAGE) {
      Object.assign(record, { type: "text", text: v.data.content, name: v.data.name || "" });
      record.gap = Boolean(contact && v.data.last_id && !(contact.recentRefs || []).includes(v.data.last_id));
    } else if (v.type === RAW_DATA) {
      Object.assign(record, { type: "file", fileData: v.data, size: Math.floor(v.data.length * 3 / 4) - (v.data.match(/=*$/)[0].length) });
    } else {
      record.type = "token_request";
    }
    if (contact && v.type !== TOKEN_REQUEST) remember(contact, v.ref);
    return { record, changed };
  }

  /**
   * Fetch everything pending: each message is verified and stored (committed to IndexedDB)
   * before it is acknowledged, so a closed tab never loses one. Returns the new records.
   */
  async fetchNew() {
    const fresh = [];
    for (let round = 0; round < MAX_ROUNDS; round++) {
      const answer = await this.relay.signed(this.identity, "GET", `${API}/message`);
      let list;
      try {
        list = await openJson(this.identity.decryptKey, answer);
      } catch (e) {
        throw new UserError(`The relay's answer cannot be opened with this identity's key (${e.message}).`);
      }
      if (!Array.isArray(list)) throw new UserError("The relay's answer is not a list of messages.");
      const handled = [];
      for (const sm of list) {
        if (!sm || typeof sm.id !== "string") continue;
        handled.push(sm.id);
        if (await store.get("messages", `in:${sm.id}`)) continue; // fetched before, not yet acknowledged
        const contacts = await this.contacts();
        const { record, changed } = await this.accept(sm, contacts);
        if (record.ref && (await this.messages()).some((m) => m.direction === "in" && m.ref === record.ref)) continue;
        await store.write(["contacts", "messages"], (s) => {
          changed.forEach((c) => s.contacts.put(c));
          s.messages.put(record);
        });
        fresh.push(record);
      }
      if (handled.length) await this.relay.signed(this.identity, "DELETE", `${API}/message`, { ids: handled });
      if (!handled.length || !(answer.remaining > 0)) break;
    }
    return fresh;
  }
}
