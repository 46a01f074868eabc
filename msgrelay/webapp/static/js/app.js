// The page: views, forms and polling over the Client (client.js). No inline script or style
// anywhere (the relay serves this app under a strict Content-Security-Policy).

import { Client, UserError } from "./client.js";
import { RelayError } from "./relay.js";
import { b64decode } from "./encoding.js";
import { drawQr } from "./qr.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["setup", "messages", "contacts", "invite", "account", "about", "loading"];
const POLL_MIN = 2000;
const POLL_MAX = 60000;
let client = null;
let pollDelay = POLL_MIN;
let pollTimer = null;

function el(tag, attrs = {}, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const kid of kids) node.append(kid);
  return node;
}

// -- messages to the person ---------------------------------------------------------------

function describe(error) {
  if (error instanceof UserError || error instanceof RelayError) return error.message;
  if (error && error.name === "QuotaExceededError") return "The browser's storage is full.";
  if (error && error.name === "OperationError") return "The browser's cryptography refused the operation.";
  return `Something went wrong: ${error && error.message ? error.message : String(error)}`;
}

function showError(error) {
  const box = $("error");
  box.textContent = typeof error === "string" ? error : describe(error);
  box.hidden = false;
  if (error && error.keyChange) showRelayKeyChange(error.keyChange);
}

function notice(text) {
  $("error").hidden = true;
  const box = $("notice");
  box.textContent = text;
  box.hidden = false;
}

function clearMessages() {
  $("error").hidden = true;
  $("notice").hidden = true;
}

/** Run a form action with its button disabled, showing any failure in words. */
function action(button, work) {
  return async (event) => {
    if (event) event.preventDefault();
    clearMessages();
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    try {
      await work();
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
      if (client) await updateKeyWarning().catch(() => {});
    }
  };
}

// -- views --------------------------------------------------------------------------------

function show(view) {
  if (!client && !["about", "setup"].includes(view)) view = "setup";
  for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
  for (const button of document.querySelectorAll("nav button")) {
    if (button.dataset.view === view) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
    if (button.dataset.view !== "about") button.hidden = !client;
  }
  if (view === "messages") renderMessages().catch(showError);
  if (view === "contacts") renderContacts().catch(showError);
  if (view === "account") renderAccount().catch(showError);
}

function route() {
  const hash = decodeURIComponent(location.hash.slice(1));
  if (hash.startsWith("add=") && client) {
    $("contact-invite").value = hash.slice(4);
    show("contacts");
    $("contact-name").focus();
    return;
  }
  show(VIEWS.includes(hash) ? hash : client ? "messages" : "setup");
}

// -- messages -----------------------------------------------------------------------------

async function renderConversationChoices() {
  const select = $("conversation");
  const current = select.value;
  const contacts = await client.contacts();
  select.replaceChildren(...contacts.map((c) => el("option", { value: c.name, text: c.pending ? `${c.name} (key changed!)` : c.name })));
  if (contacts.some((c) => c.name === current)) select.value = current;
  const none = contacts.length === 0;
  $("send-submit").disabled = none;
  $("file-submit").disabled = none;
  return contacts;
}

function messageItem(m) {
  const who = m.direction === "out" ? "You" : m.contact || m.from || "Unknown sender";
  const li = el("li", { class: `${m.direction} ${m.status}`, "data-status": m.status, "data-type": m.type });
  li.append(el("div", { class: "meta" }, el("strong", { text: who }), ` · ${m.date || m.received || ""}`));
  if (m.status === "rejected") {
    li.append(el("div", { class: "state rejected", text: `Not trusted: ${m.detail}` }));
    return li;
  }
  if (m.type === "text") li.append(el("div", { class: "text", text: m.text }));
  if (m.type === "file") {
    const bytes = b64decode(m.fileData);
    const url = URL.createObjectURL(new Blob([bytes]));
    const name = m.fileName || `file-${(m.date || "").replace(/[^0-9]/g, "")}`;
    li.append(el("div", {}, el("a", { href: url, download: name, text: `${m.direction === "out" ? "Sent" : "Received"} file ${name} (${bytes.length} bytes)` })));
  }
  if (m.type === "token_request") li.append(el("div", { class: "text", text: `${who} can now be written to (they sent an access token).` }));
  if (m.direction === "in") {
    const state = m.newContact ? `Signature verified; new contact, key fingerprint ${m.fingerprint}` : `Signature verified (key ${m.fingerprint.slice(0, 16)}…)`;
    li.append(el("div", { class: "state verified", text: state }));
    if (m.gap) li.append(el("div", { class: "state", text: "An earlier message of this conversation has not arrived." }));
  } else {
    li.append(el("div", { class: "state", text: "Sent" }));
  }
  return li;
}

async function renderMessages() {
  const contacts = await renderConversationChoices();
  const name = $("conversation").value;
  const all = await client.messages();
  const shown = all.filter((m) => m.contact === name || (m.contact === null && m.direction === "in"));
  const list = $("message-list");
  list.replaceChildren(...shown.map(messageItem));
  if (!contacts.length) list.append(el("li", { text: "No contacts yet: add one from an invite, or send someone your invite." }));
  await updateKeyWarning();
}

async function updateKeyWarning() {
  const name = $("conversation").value;
  const box = $("key-warning");
  const contact = name ? await client.contact(name).catch(() => null) : null;
  if (contact && contact.pending) {
    box.textContent = `Warning: the key of ${name} has changed. ${contact.pending.reason} Sending to ${name} is blocked until you confirm the new key on the Contacts page.`;
    box.hidden = false;
    $("send-submit").disabled = true;
    $("file-submit").disabled = true;
  } else {
    box.hidden = true;
    const none = !name;
    $("send-submit").disabled = none;
    $("file-submit").disabled = none;
  }
}

// -- polling with backoff -----------------------------------------------------------------

function schedulePoll(delay) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(poll, delay);
}

async function poll() {
  if (!client) return;
  try {
    const fresh = await client.fetchNew();
    pollDelay = fresh.length ? POLL_MIN : Math.min(POLL_MAX, pollDelay * 2);
    $("poll-status").textContent = `Checked at ${new Date().toLocaleTimeString()}${fresh.length ? `: ${fresh.length} new` : ""}; next check in ${Math.round(pollDelay / 1000)} s.`;
    if (fresh.length && !$("view-messages").hidden) await renderMessages();
  } catch (error) {
    const wait = Math.max(pollDelay, (error.retryAfter || 0) * 1000);
    pollDelay = Math.min(POLL_MAX, pollDelay * 2);
    $("poll-status").textContent = `Could not check for messages: ${describe(error)} Trying again in ${Math.round(wait / 1000)} s.`;
    if (error.keyChange) showError(error);
    schedulePoll(wait);
    return;
  }
  schedulePoll(pollDelay);
}

function pollSoon() {
  pollDelay = POLL_MIN;
  schedulePoll(0);
}

// -- contacts -----------------------------------------------------------------------------

async function renderContacts() {
  const list = $("contact-list");
  const contacts = await client.contacts();
  list.replaceChildren(...contacts.map((c) => {
    const li = el("li", { "data-contact": c.name },
      el("strong", { text: c.name }), " ", el("span", { class: "address", text: c.address }),
      el("div", { class: "fingerprint", text: `Key fingerprint: ${c.fingerprint}` }),
      el("div", { class: "muted", text: c.token ? "You can write to them." : "You cannot write yet: they must invite you or write first." }));
    if (c.pending) {
      const box = el("div", { class: "warning", role: "alert" },
        el("p", { text: `Key changed: ${c.pending.reason} New address ${c.pending.address}, new fingerprint ${c.pending.fingerprint}. Compare it with ${c.name} before you accept it.` }));
      const confirm = el("button", { type: "button", class: "confirm-key", text: `Accept the new key of ${c.name}` });
      confirm.addEventListener("click", action(confirm, async () => {
        await client.confirmKey(c.name);
        notice(`${c.name} now has the new key ${c.pending.fingerprint}.`);
        await renderContacts();
      }));
      const keep = el("button", { type: "button", text: "Keep the old key" });
      keep.addEventListener("click", action(keep, async () => {
        await client.keepOldKey(c.name);
        await renderContacts();
      }));
      box.append(confirm, " ", keep);
      li.append(box);
    }
    const remove = el("button", { type: "button", text: `Remove ${c.name}` });
    remove.addEventListener("click", action(remove, async () => {
      await client.removeContact(c.name);
      notice(`Removed ${c.name}; the token you gave them is revoked.`);
      await renderContacts();
    }));
    li.append(remove);
    return li;
  }));
  if (!contacts.length) list.append(el("li", { text: "No contacts yet." }));
}

// -- account ------------------------------------------------------------------------------

async function renderAccount() {
  const id = client.identity;
  const rows = [["Your address", client.address], ["Your key fingerprint", id.fingerprint], ["Relay", id.relayUrl],
    ["Relay name", id.serverName], ["Relay key fingerprint (pinned)", id.serverFingerprint]];
  $("whoami").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { class: "address", text: v })]));
  $("whoami").querySelectorAll("dd")[0].id = "my-address";
  try {
    const account = await client.account();
    $("push-url").value = account.push_endpoint || "";
  } catch (error) {
    if (![132, 133].includes(error.errno)) throw error; // a relay before revision 2 has no GET /user
  }
}

async function renderTokens() {
  const table = $("token-table");
  const tokens = await client.tokens();
  table.tBodies[0].replaceChildren(...tokens.map((t) => {
    const revoke = el("button", { type: "button", text: "Revoke", "aria-label": `Revoke token ${t.label || t.id}` });
    revoke.addEventListener("click", action(revoke, async () => {
      await client.revokeToken(t.id);
      notice(`Revoked token ${t.label || t.id}: whoever holds it can no longer write to you.`);
      await renderTokens();
    }));
    return el("tr", { "data-token": t.id }, el("td", { text: t.label || t.id }), el("td", { text: t.created || "" }),
      el("td", { text: t.expires || "never" }), el("td", {}, revoke));
  }));
  table.hidden = false;
}

function showRelayKeyChange(change) {
  $("relay-key-text").textContent = `The relay now presents key ${change.to}; this app trusts ${change.from}. Accept the new key only after the relay's operator confirmed its fingerprint.`;
  $("relay-key").hidden = false;
  $("relay-key-trust").onclick = action($("relay-key-trust"), async () => {
    await client.trustRelayKey(change.to);
    $("relay-key").hidden = true;
    notice("The new relay key is now trusted.");
    pollSoon();
  });
}

function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/x-pem-file" }));
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// -- wiring -------------------------------------------------------------------------------

async function started(newClient, message) {
  client = newClient;
  client.onNotice = notice;
  if (message) notice(message);
  location.hash = "messages";
  show("messages");
  pollSoon();
}

function wire() {
  for (const button of document.querySelectorAll("nav button")) {
    button.addEventListener("click", () => {
      location.hash = button.dataset.view;
    });
  }
  window.addEventListener("hashchange", route);

  $("create-form").addEventListener("submit", action($("create-submit"), async () => {
    if ($("create-pass").value !== $("create-pass2").value) throw new UserError("The two passphrases differ.");
    notice("Making your key (this can take a few seconds)…");
    const made = await Client.setUp({ relayUrl: $("create-relay").value, displayName: $("create-name").value,
      passphrase: $("create-pass").value, registrationToken: $("create-regtoken").value.trim() });
    $("create-form").reset();
    await started(made, `Welcome. Your address is ${made.address}. Download your identity file from the Account page and keep it safe.`);
  }));

  $("import-form").addEventListener("submit", action($("import-submit"), async () => {
    const file = $("import-file").files[0];
    if (!file) throw new UserError("Choose the identity file first.");
    if (file.size > 65536) throw new UserError("That file is too large to be a key file.");
    const made = await Client.importFile({ fileText: await file.text(), passphrase: $("import-pass").value,
      relayUrl: $("import-relay").value, displayName: $("import-name").value });
    $("import-form").reset();
    await started(made, `Identity imported. Your address is ${made.address}.`);
  }));

  $("conversation").addEventListener("change", () => renderMessages().catch(showError));
  $("check-now").addEventListener("click", () => pollSoon());

  $("send-form").addEventListener("submit", action($("send-submit"), async () => {
    const name = $("conversation").value;
    const text = $("send-text").value;
    if (!text.trim()) throw new UserError("Write a message first.");
    await client.send(name, "text", text);
    $("send-text").value = "";
    await renderMessages();
    pollSoon();
  }));

  $("file-form").addEventListener("submit", action($("file-submit"), async () => {
    const file = $("send-file").files[0];
    if (!file) throw new UserError("Choose a file first.");
    if (file.size > 1 << 20) throw new UserError("Only small files can be sent (at most 1 MiB here, less on most relays).");
    await client.send($("conversation").value, "file", new Uint8Array(await file.arrayBuffer()), file.name);
    $("file-form").reset();
    await renderMessages();
  }));

  $("contact-form").addEventListener("submit", action($("contact-submit"), async () => {
    const name = $("contact-name").value.trim();
    const result = await client.addContact(name, $("contact-invite").value, $("contact-relay").value.trim());
    $("contact-form").reset();
    if (result.status === "pending") showError(`Warning: ${result.contact.pending.reason} Nothing was changed; sending to ${name} is blocked until you accept the new key below.`);
    else notice(`${result.status === "added" ? "Added" : "Updated"} ${name}: ${result.contact.address}, key fingerprint ${result.contact.fingerprint} (pinned; compare it with ${name}).`);
    if (location.hash.startsWith("#add=")) history.replaceState(null, "", "#contacts");
    await renderContacts();
  }));

  $("invite-form").addEventListener("submit", action($("invite-submit"), async () => {
    const text = await client.makeInvite($("invite-for").value.trim());
    $("invite-text").value = text;
    const link = new URL(location.href);
    link.hash = `add=${encodeURIComponent(text)}`;
    $("invite-link").href = link.href;
    $("invite-link").textContent = link.href;
    try {
      drawQr($("invite-qr"), text);
      $("invite-qr-figure").hidden = false;
    } catch {
      $("invite-qr-figure").hidden = true; // too long for a QR code: the text and link still work
    }
    $("invite-result").hidden = false;
    $("invite-text").focus();
    $("invite-text").select();
  }));
  $("invite-copy").addEventListener("click", action($("invite-copy"), async () => {
    await navigator.clipboard.writeText($("invite-text").value);
    notice("Copied.");
  }));

  $("export-identity").addEventListener("click", action($("export-identity"), async () => {
    download(`msgrelay-${client.identity.userId.slice(0, 8)}.pem`, client.identity.backup);
  }));
  $("tokens-refresh").addEventListener("click", action($("tokens-refresh"), renderTokens));
  $("push-form").addEventListener("submit", action($("push-set"), async () => {
    const url = $("push-url").value.trim();
    await client.setPushEndpoint(url);
    notice(url ? `Push endpoint set to ${url}.` : "Push endpoint cleared.");
  }));
  $("push-clear").addEventListener("click", action($("push-clear"), async () => {
    await client.setPushEndpoint("");
    $("push-url").value = "";
    notice("Push endpoint cleared.");
  }));
  $("delete-form").addEventListener("submit", action($("delete-submit"), async () => {
    const address = client.address;
    await client.deleteAccount();
    clearTimeout(pollTimer);
    client = null;
    $("delete-form").reset();
    location.hash = "setup";
    show("setup");
    notice(`The account ${address} is deleted at the relay, and this browser forgot it.`);
  }));
}

async function main() {
  wire();
  if (location.pathname.endsWith("/app/") || location.pathname.endsWith("/app/index.html")) {
    const here = location.origin;
    $("create-relay").value = here;
    $("import-relay").value = here;
  }
  try {
    client = await Client.load();
  } catch (error) {
    showError(`This browser's storage cannot be used (${describe(error)}); private windows may block it.`);
  }
  if (client) {
    client.onNotice = notice;
    pollSoon();
  }
  route();
  document.body.dataset.ready = "true";
}

main();
