// Canonical JSON (PROTOCOL section 4, RFC 8785 for the values the protocol allows):
// sorted ASCII keys, no whitespace, integers within ±(2^53-1) only, valid Unicode strings.

import { utf8 } from "./encoding.js";

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

function serialise(value, where) {
  if (value === null || value === true || value === false) return String(value);
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value)) throw new Error(`${where}: only integers within ±(2^53-1) can be signed`);
    return String(value);
  }
  if (typeof value === "string") {
    if (LONE_SURROGATE.test(value)) throw new Error(`${where}: string is not valid Unicode`);
    return JSON.stringify(value); // RFC 8785 string escaping: \" \\ \b \f \n \r \t, other controls \u00xx
  }
  if (Array.isArray(value)) return "[" + value.map((v, i) => serialise(v, `${where}[${i}]`)).join(",") + "]";
  if (typeof value === "object") {
    const keys = Object.keys(value).filter((k) => value[k] !== undefined).sort();
    for (const key of keys) {
      if (!/^[\x00-\x7f]*$/.test(key)) throw new Error(`${where}: object key ${JSON.stringify(key)} is not ASCII`);
    }
    return "{" + keys.map((k) => JSON.stringify(k) + ":" + serialise(value[k], `${where}.${k}`)).join(",") + "}";
  }
  throw new Error(`${where}: a ${typeof value} cannot be signed`);
}

/** The canonical text of `value`. */
export function canonicalText(value) {
  return serialise(value, "$");
}

/** The canonical UTF-8 bytes of `value`: what signatures cover. */
export function canonicalJson(value) {
  return utf8(serialise(value, "$"));
}
