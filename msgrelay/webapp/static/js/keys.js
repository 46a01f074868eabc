// RSA keys with WebCrypto only: generation, PEM, user ids and fingerprints (PROTOCOL section 2),
// envelopes (section 3), RSA-PSS signatures (section 4), and the passphrase-encrypted
// PKCS#8 identity file that msgrelay-client also reads and writes.

import { b64decode, b64encode, base32, concat, fromUtf8, hex, randomBytes, utf8 } from "./encoding.js";
import { OID, TAG, children, fromPem, int, integer, nullValue, octets, oid, oidText, read, seq, toPem } from "./der.js";

const subtle = crypto.subtle;
export const PSS = { name: "RSA-PSS", hash: "SHA-256" };
export const OAEP = { name: "RSA-OAEP", hash: "SHA-256" };
export const SALT_LENGTH = 32;
export const KEY_BITS = 3072;
const E65537 = new Uint8Array([1, 0, 1]);

export async function sha256(bytes) {
  return new Uint8Array(await subtle.digest("SHA-256", bytes));
}

// -- public keys --------------------------------------------------------------------------

/** {spki, pem, userId, fingerprint} of a PEM SubjectPublicKeyInfo. */
export async function describePublicKey(pem) {
  const { label, der } = fromPem(pem);
  if (label !== "PUBLIC KEY") throw new Error("not a PEM public key (-----BEGIN PUBLIC KEY-----)");
  const digest = await sha256(der);
  return { spki: der, pem, userId: base32(digest.subarray(0, 20)), fingerprint: hex(digest) };
}

/** Import a public key for one purpose ("verify" or "encrypt"), checking the protocol's limits. */
export async function importPublicKey(pem, usage) {
  const { der } = fromPem(pem);
  const algorithm = usage === "verify" ? PSS : OAEP;
  const key = await subtle.importKey("spki", der, algorithm, true, [usage]);
  const bits = key.algorithm.modulusLength;
  const e = key.algorithm.publicExponent;
  if (bits < 2048 || bits > 8192) throw new Error(`a ${bits}-bit key is outside 2048 to 8192 bits`);
  if (e.length !== 3 || e.some((b, i) => b !== E65537[i])) throw new Error("the public exponent is not 65537");
  return key;
}

export function publicPem(spki) {
  return toPem("PUBLIC KEY", spki);
}

// -- our own key pair ---------------------------------------------------------------------

/** A fresh 3072-bit key: its PKCS#8 bytes, to be imported non-extractable and then dropped. */
export async function generatePkcs8() {
  const pair = await subtle.generateKey(
    { name: "RSA-PSS", modulusLength: KEY_BITS, publicExponent: E65537, hash: "SHA-256" }, true, ["sign", "verify"]);
  return new Uint8Array(await subtle.exportKey("pkcs8", pair.privateKey));
}

/**
 * The non-extractable keys of an identity from its PKCS#8 bytes: one RSA-PSS key to sign,
 * one RSA-OAEP key to decrypt, and the public key's PEM. The caller drops `pkcs8` afterwards.
 */
export async function identityKeys(pkcs8) {
  const signKey = await subtle.importKey("pkcs8", pkcs8, PSS, false, ["sign"]);
  const decryptKey = await subtle.importKey("pkcs8", pkcs8, OAEP, false, ["decrypt"]);
  // The public half: through a short-lived extractable copy (WebCrypto has no "public of private").
  const temporary = await subtle.importKey("pkcs8", pkcs8, PSS, true, ["sign"]);
  const jwk = await subtle.exportKey("jwk", temporary);
  const bits = signKey.algorithm.modulusLength;
  if (bits < 2048 || bits > 8192 || jwk.e !== "AQAB") throw new Error("the key is not an RSA key of 2048 to 8192 bits with exponent 65537");
  const pub = await subtle.importKey("jwk", { kty: "RSA", n: jwk.n, e: jwk.e, ext: true }, PSS, true, ["verify"]);
  const spki = new Uint8Array(await subtle.exportKey("spki", pub));
  const info = await describePublicKey(publicPem(spki));
  return { signKey, decryptKey, ...info };
}

// -- signatures ---------------------------------------------------------------------------

export async function sign(signKey, bytes) {
  return b64encode(new Uint8Array(await subtle.sign({ name: "RSA-PSS", saltLength: SALT_LENGTH }, signKey, bytes)));
}

/** True when `signature` is the canonical base64 of a modulus-sized PSS signature of `bytes`. */
export async function verify(verifyKey, signature, bytes) {
  let raw;
  try {
    raw = b64decode(signature);
  } catch {
    return false;
  }
  if (raw.length !== Math.ceil(verifyKey.algorithm.modulusLength / 8) || b64encode(raw) !== signature) return false;
  return subtle.verify({ name: "RSA-PSS", saltLength: SALT_LENGTH }, verifyKey, raw, bytes);
}

// -- envelopes ----------------------------------------------------------------------------

export const AES_GCM = "AES-256-GCM";

/** Seal `plaintext` (bytes) to an RSA-OAEP public key: {algorithm, password, data}. */
export async function seal(encryptKey, plaintext) {
  const raw = randomBytes(32);
  const nonce = randomBytes(12);
  const aes = await subtle.importKey("raw", raw, "AES-GCM", false, ["encrypt"]);
  const sealed = new Uint8Array(await subtle.encrypt({ name: "AES-GCM", iv: nonce }, aes, plaintext));
  const password = new Uint8Array(await subtle.encrypt({ name: "RSA-OAEP" }, encryptKey, raw));
  return { algorithm: AES_GCM, password: b64encode(password), data: b64encode(concat(nonce, sealed)) };
}

/** Open an AES-256-GCM envelope sealed to us; throws an Error saying what failed. */
export async function openEnvelope(decryptKey, envelope) {
  for (const name of ["algorithm", "password", "data"]) {
    if (typeof envelope[name] !== "string") throw new Error(`the envelope has no ${name}`);
  }
  if (envelope.algorithm.toUpperCase() !== AES_GCM) throw new Error(`unsupported algorithm ${envelope.algorithm}`);
  const wrapped = b64decode(envelope.password);
  const sealed = b64decode(envelope.data);
  if (sealed.length < 28) throw new Error("the data is shorter than a nonce and a tag");
  let raw;
  try {
    raw = new Uint8Array(await subtle.decrypt({ name: "RSA-OAEP" }, decryptKey, wrapped));
  } catch {
    throw new Error("the password does not decrypt with this identity's key");
  }
  if (raw.length !== 32) throw new Error("the password is not a 32-byte key");
  const aes = await subtle.importKey("raw", raw, "AES-GCM", false, ["decrypt"]);
  try {
    return new Uint8Array(await subtle.decrypt({ name: "AES-GCM", iv: sealed.subarray(0, 12) }, aes, sealed.subarray(12)));
  } catch {
    throw new Error("the data does not decrypt (tampered with or damaged)");
  }
}

/** Open an envelope and parse its UTF-8 JSON plaintext. */
export async function openJson(decryptKey, envelope) {
  return JSON.parse(fromUtf8(await openEnvelope(decryptKey, envelope)));
}

// -- the identity file: PKCS#8, encrypted with PBES2 (PBKDF2-HMAC-SHA256 + AES-256-CBC) --------

export const EXPORT_ITERATIONS = 600000;
const PRF = { [OID.HMAC_SHA1]: "SHA-1", [OID.HMAC_SHA256]: "SHA-256", [OID.HMAC_SHA384]: "SHA-384", [OID.HMAC_SHA512]: "SHA-512" };
const AES_BITS = { [OID.AES128_CBC]: 128, [OID.AES192_CBC]: 192, [OID.AES256_CBC]: 256 };

async function pbkdf2Key(passphrase, salt, iterations, hash, bits, usage) {
  const base = await subtle.importKey("raw", utf8(passphrase), "PBKDF2", false, ["deriveKey"]);
  return subtle.deriveKey({ name: "PBKDF2", salt, iterations, hash }, base, { name: "AES-CBC", length: bits }, false, [usage]);
}

/** `-----BEGIN ENCRYPTED PRIVATE KEY-----`, as `msgrelay-client init --passphrase` writes it. */
export async function encryptPkcs8(pkcs8, passphrase, iterations = EXPORT_ITERATIONS) {
  if (!passphrase) throw new Error("the passphrase must not be empty");
  const salt = randomBytes(16);
  const iv = randomBytes(16);
  const key = await pbkdf2Key(passphrase, salt, iterations, "SHA-256", 256, "encrypt");
  const encrypted = new Uint8Array(await subtle.encrypt({ name: "AES-CBC", iv }, key, pkcs8));
  const der = seq(
    seq(oid(OID.PBES2), seq(
      seq(oid(OID.PBKDF2), seq(octets(salt), int(iterations), seq(oid(OID.HMAC_SHA256), nullValue()))),
      seq(oid(OID.AES256_CBC), octets(iv)))),
    octets(encrypted));
  return toPem("ENCRYPTED PRIVATE KEY", der);
}

/** The PKCS#8 bytes of an identity file (encrypted, or a plain PKCS#8 PEM). */
export async function decryptPkcs8(pemText, passphrase) {
  let block;
  try {
    block = fromPem(pemText);
  } catch {
    throw new Error("this file is not a private key file (no -----BEGIN ... PRIVATE KEY----- block)");
  }
  if (block.label === "PRIVATE KEY") return block.der;
  if (block.label === "RSA PRIVATE KEY") {
    throw new Error("this is an old-style RSA key file; convert it first: openssl pkcs8 -topk8 -v2 aes-256-cbc -in OLD -out NEW");
  }
  if (block.label !== "ENCRYPTED PRIVATE KEY") throw new Error(`this file holds a ${block.label.toLowerCase()}, not a private key`);
  let params;
  try {
    const [algorithm, data] = children(read(block.der));
    const [scheme, pbes2] = children(algorithm);
    if (oidText(scheme) !== OID.PBES2) throw new Error("scheme");
    const [kdf, cipher] = children(pbes2);
    const [kdfOid, kdfParams] = children(kdf);
    if (oidText(kdfOid) !== OID.PBKDF2) throw new Error("kdf");
    const fields = children(kdfParams);
    const salt = fields[0].value;
    const iterations = integer(fields[1]);
    let hash = "SHA-1";
    const prf = fields.slice(2).find((f) => f.tag === TAG.SEQUENCE);
    if (prf) hash = PRF[oidText(children(prf)[0])];
    const [cipherOid, iv] = children(cipher);
    const bits = AES_BITS[oidText(cipherOid)];
    if (!hash || !bits || iv.tag !== TAG.OCTET_STRING) throw new Error("cipher");
    params = { salt, iterations, hash, bits, iv: iv.value, data: data.value };
  } catch {
    throw new Error("this key file is encrypted with a scheme the browser cannot open (it needs PBES2 with PBKDF2 and AES-CBC)");
  }
  if (!passphrase) throw new Error("this key file is encrypted: enter its passphrase");
  const key = await pbkdf2Key(passphrase, params.salt, params.iterations, params.hash, params.bits, "decrypt");
  try {
    return new Uint8Array(await subtle.decrypt({ name: "AES-CBC", iv: params.iv }, key, params.data));
  } catch {
    throw new Error("wrong passphrase, or the file is damaged");
  }
}
