// The little DER (ASN.1) needed for PEM keys and PKCS#8 EncryptedPrivateKeyInfo (RFC 5958, RFC 8018).

import { b64decode, b64encode, concat } from "./encoding.js";

export const TAG = { INTEGER: 0x02, OCTET_STRING: 0x04, NULL: 0x05, OID: 0x06, SEQUENCE: 0x30 };

export const OID = {
  PBES2: "1.2.840.113549.1.5.13",
  PBKDF2: "1.2.840.113549.1.5.12",
  HMAC_SHA1: "1.2.840.113549.2.7",
  HMAC_SHA256: "1.2.840.113549.2.9",
  HMAC_SHA384: "1.2.840.113549.2.10",
  HMAC_SHA512: "1.2.840.113549.2.11",
  AES128_CBC: "2.16.840.1.101.3.4.1.2",
  AES192_CBC: "2.16.840.1.101.3.4.1.22",
  AES256_CBC: "2.16.840.1.101.3.4.1.42",
};

/** Read one TLV at `at`: {tag, value (bytes), end}. */
export function read(bytes, at = 0) {
  if (at + 2 > bytes.length) throw new Error("truncated DER");
  const tag = bytes[at];
  let length = bytes[at + 1];
  let start = at + 2;
  if (length & 0x80) {
    const n = length & 0x7f;
    if (n === 0 || n > 4 || start + n > bytes.length) throw new Error("bad DER length");
    length = 0;
    for (let i = 0; i < n; i++) length = length * 256 + bytes[start + i];
    start += n;
  }
  if (start + length > bytes.length) throw new Error("truncated DER");
  return { tag, value: bytes.subarray(start, start + length), end: start + length };
}

/** The TLVs inside a constructed value, checking the expected tag. */
export function children(node, tag = TAG.SEQUENCE) {
  if (node.tag !== tag) throw new Error(`expected DER tag ${tag}, found ${node.tag}`);
  const out = [];
  let at = 0;
  while (at < node.value.length) {
    const child = read(node.value, at);
    out.push(child);
    at = child.end;
  }
  return out;
}

export function oidText(node) {
  if (node.tag !== TAG.OID) throw new Error("expected an OID");
  const parts = [];
  let value = 0;
  for (const byte of node.value) {
    value = value * 128 + (byte & 0x7f);
    if (!(byte & 0x80)) {
      if (parts.length === 0) parts.push(Math.min(2, Math.floor(value / 40)), value - 40 * Math.min(2, Math.floor(value / 40)));
      else parts.push(value);
      value = 0;
    }
  }
  return parts.join(".");
}

export function integer(node) {
  if (node.tag !== TAG.INTEGER || node.value.length > 6) throw new Error("expected a small INTEGER");
  return node.value.reduce((n, b) => n * 256 + b, 0);
}

// -- writing ------------------------------------------------------------------------------

export function tlv(tag, value) {
  const n = value.length;
  let header;
  if (n < 0x80) header = [tag, n];
  else if (n < 0x100) header = [tag, 0x81, n];
  else if (n < 0x10000) header = [tag, 0x82, n >> 8, n & 0xff];
  else header = [tag, 0x83, n >> 16, (n >> 8) & 0xff, n & 0xff];
  return concat(new Uint8Array(header), value);
}

export const seq = (...items) => tlv(TAG.SEQUENCE, concat(...items));
export const octets = (bytes) => tlv(TAG.OCTET_STRING, bytes);
export const nullValue = () => tlv(TAG.NULL, new Uint8Array(0));

export function int(n) {
  const bytes = [];
  do {
    bytes.unshift(n % 256);
    n = Math.floor(n / 256);
  } while (n > 0);
  if (bytes[0] & 0x80) bytes.unshift(0);
  return tlv(TAG.INTEGER, new Uint8Array(bytes));
}

export function oid(text) {
  const parts = text.split(".").map(Number);
  const bytes = [40 * parts[0] + parts[1]];
  for (const part of parts.slice(2)) {
    const chunk = [part & 0x7f];
    let rest = Math.floor(part / 128);
    while (rest > 0) {
      chunk.unshift((rest & 0x7f) | 0x80);
      rest = Math.floor(rest / 128);
    }
    bytes.push(...chunk);
  }
  return tlv(TAG.OID, new Uint8Array(bytes));
}

// -- PEM ----------------------------------------------------------------------------------

export function toPem(label, der) {
  const lines = b64encode(der).match(/.{1,64}/g) || [];
  return `-----BEGIN ${label}-----\n${lines.join("\n")}\n-----END ${label}-----\n`;
}

/** {label, der} of the first PEM block in `text`. */
export function fromPem(text) {
  const match = /-----BEGIN ([A-Z0-9 ]+)-----([\s\S]*?)-----END \1-----/.exec(text);
  if (!match) throw new Error("no PEM block found");
  return { label: match[1], der: b64decode(match[2].replace(/\s+/g, "")) };
}
