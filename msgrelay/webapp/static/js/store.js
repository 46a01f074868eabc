// IndexedDB: the identity (non-extractable CryptoKeys), contacts, messages and settings.
// One database per origin; everything stays in this browser profile.

const NAME = "msgrelay";
const VERSION = 1;
let opened = null;

function wait(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

export function openDb() {
  if (!opened) {
    const request = indexedDB.open(NAME, VERSION);
    request.onupgradeneeded = () => {
      const db = request.result;
      db.createObjectStore("kv");
      db.createObjectStore("contacts", { keyPath: "name" });
      db.createObjectStore("messages", { keyPath: "id" });
    };
    opened = wait(request);
  }
  return opened;
}

/** Run `work(stores)` in one read-write transaction and resolve once it is durably committed. */
export async function write(names, work) {
  const db = await openDb();
  const tx = db.transaction(names, "readwrite", { durability: "strict" });
  const stores = Object.fromEntries(names.map((n) => [n, tx.objectStore(n)]));
  const done = new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new Error("the browser's storage refused the change"));
  });
  work(stores);
  return done;
}

export async function get(store, key) {
  const db = await openDb();
  return wait(db.transaction(store).objectStore(store).get(key));
}

export async function all(store) {
  const db = await openDb();
  return wait(db.transaction(store).objectStore(store).getAll());
}

export const put = (store, value, key) => write([store], (s) => s[store].put(value, key));
export const remove = (store, key) => write([store], (s) => s[store].delete(key));

/** Forget everything on this device (after deleting the account, or on request). */
export const clearAll = () => write(["kv", "contacts", "messages"], (s) => Object.values(s).forEach((o) => o.clear()));
