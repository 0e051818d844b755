// Unit tests of jwtClaims and jwtExpiryMs (static/app.js): how the page reads a token it does not verify, to name
// the identity a sign-in link would use before it connects. Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";

import { jwtClaims, jwtExpiryMs } from "../../static/app.js";

const b64url = (text) => Buffer.from(text, "utf8").toString("base64url"); // unpadded, - and _
const tokenOf = (payload) => `eyJhbGciOiJIUzI1NiJ9.${b64url(typeof payload === "string" ? payload : JSON.stringify(payload))}.c2ln`;

test("jwtClaims reads sub, name and exp, and nothing else", () => {
  const token = tokenOf({ sub: "mallory", name: "Mallory", exp: 1_700_000_000, iat: 1, rooms: ["lobby"] });
  assert.deepEqual(jwtClaims(token), { sub: "mallory", name: "Mallory", exp: 1_700_000_000 });
});

test("jwtClaims: absent claims are null, not guessed", () => {
  assert.deepEqual(jwtClaims(tokenOf({ sub: "u1" })), { sub: "u1", name: null, exp: null });
  assert.deepEqual(jwtClaims(tokenOf({ name: "Mallory", exp: 2_000_000_000 })),
    { sub: null, name: "Mallory", exp: 2_000_000_000 }, "missing sub");
  assert.deepEqual(jwtClaims(tokenOf({})), { sub: null, name: null, exp: null });
});

test("jwtClaims: claims of the wrong type count as absent", () => {
  for (const sub of ["", 42, true, ["a"], { id: "a" }, null]) {
    assert.equal(jwtClaims(tokenOf({ sub, exp: 1 })).sub, null, JSON.stringify(sub));
  }
  for (const name of ["", 7, { toString: "x" }]) assert.equal(jwtClaims(tokenOf({ sub: "u", name })).name, null);
  for (const exp of ["1700000000", null, true, []]) assert.equal(jwtClaims(tokenOf({ sub: "u", exp })).exp, null);
  assert.equal(jwtClaims(tokenOf('{"sub": "u", "exp": 1e999}')).exp, null, "Infinity is not an expiry");
});

test("jwtClaims: garbage is null, never an exception", () => {
  const bad = [
    "", "abc", "a.b", "a.b.c.d", "a.!!!.c", "a.%%%.c", "a..c", "a.A.c", // not three parts, or not base64url
    tokenOf("null"), tokenOf("[1, 2]"), tokenOf('"mallory"'), tokenOf("42"), tokenOf("{not json"),
    tokenOf('{"sub": "u"} trailing'), undefined, null, 42, {}, ["a", "b", "c"],
    tokenOf({ sub: "u" }).split(".").slice(0, 2).join("."), `${tokenOf({ sub: "u" })}.x`, // a good payload, 2 or 4 parts
  ];
  for (const token of bad) assert.equal(jwtClaims(token), null, String(token));
});

test("jwtClaims: a payload that is not UTF-8 is refused, not mangled", () => {
  const latin1 = Buffer.from('{"sub": "u", "name": "Zo\xeb"}', "latin1").toString("base64url"); // 0xEB alone
  assert.equal(jwtClaims(`h.${latin1}.s`), null);
});

test("jwtClaims decodes base64url with and without padding, at every length", () => {
  const alphabet = new Set();
  for (let n = 1; n <= 12; n += 1) {
    const claims = { sub: "u".repeat(n), name: "?>~".repeat(n), exp: 1_700_000_000 + n };
    const part = b64url(JSON.stringify(claims));
    for (const c of part) alphabet.add(c);
    assert.deepEqual(jwtClaims(`h.${part}.s`), claims, `unpadded, length % 4 = ${part.length % 4}`);
    const padded = part.padEnd(Math.ceil(part.length / 4) * 4, "=");
    assert.deepEqual(jwtClaims(`h.${padded}.s`), claims, `padded to ${padded.length}`);
  }
  // The payloads above use both base64url-only characters, so the +/ mapping is exercised.
  assert.ok(alphabet.has("-") && alphabet.has("_"), [...alphabet].join(""));
});

test("jwtClaims decodes UTF-8 names: accents, CJK, emoji, combining marks", () => {
  for (const name of ["Zoë", "Łukasz Żółć", "日本語の名前", "🦊 Fox 👩‍💻", "Zoe\u0308", "ムーミン 🇫🇮"]) {
    assert.equal(jwtClaims(tokenOf({ sub: "u-1", name })).name, name);
  }
  assert.equal(jwtClaims(tokenOf({ sub: "zoë@example" })).sub, "zoë@example");
  // JSON's own escapes decode too (PyJWT writes non-ASCII that way by default).
  assert.equal(jwtClaims(tokenOf('{"sub": "u", "name": "Zo\\u00eb \\ud83e\\udd8a"}')).name, "Zoë 🦊");
});

test("jwtClaims leaves markup as text: rendering is the page's job (textContent)", () => {
  const name = '<img src=x onerror="alert(1)">';
  assert.equal(jwtClaims(tokenOf({ sub: "m", name })).name, name);
});

test("jwtExpiryMs is jwtClaims' exp in ms", () => {
  assert.equal(jwtExpiryMs(tokenOf({ sub: "u1", exp: 1_700_000_000, name: "Zoë 🦊" })), 1_700_000_000_000);
  assert.equal(jwtExpiryMs(tokenOf({ sub: "u1" })), null);
  assert.equal(jwtExpiryMs(tokenOf({ sub: "u1", exp: 0 })), 0, "0 is an expiry (long past), not absent");
  assert.equal(jwtExpiryMs("garbage"), null);
});
