// Unit tests of the pure functions of static/app.js. Run: node --test tests/js/
// Importing app.js here also proves that it does not touch the DOM at import time (Node has no document).
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  DEFAULT_LIMITS,
  checkOutgoing,
  closeAction,
  errorText,
  jwtExpiryMs,
  reconnectDelayMs,
  refreshDelayMs,
  typingText,
} from "../../static/app.js";

const fixed = (value) => () => value;

test("importing app.js has no DOM side effects", () => {
  assert.equal(typeof globalThis.document, "undefined");
  assert.equal(globalThis.chatClient, undefined);
});

test("reconnectDelayMs doubles per attempt with a fixed random", () => {
  const delays = [0, 1, 2, 3, 4, 5].map((attempt) => reconnectDelayMs(attempt, { random: fixed(1) }));
  assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 15000]);
  const half = [0, 1, 2, 3].map((attempt) => reconnectDelayMs(attempt, { random: fixed(0.5) }));
  assert.deepEqual(half, [250, 500, 1000, 2000]);
});

test("reconnectDelayMs uses the given base and cap", () => {
  const opts = { baseMs: 10, capMs: 50, random: fixed(1) };
  assert.deepEqual([0, 1, 2, 3, 4].map((a) => reconnectDelayMs(a, opts)), [10, 20, 40, 50, 50]);
  assert.equal(reconnectDelayMs(0, { baseMs: 100, capMs: 30, random: fixed(1) }), 30, "cap below base wins");
});

test("reconnectDelayMs never exceeds the cap, even for absurd attempts", () => {
  for (const attempt of [5, 6, 30, 1024, 1e6, Number.MAX_SAFE_INTEGER, Infinity]) {
    const delay = reconnectDelayMs(attempt, { random: fixed(1) });
    assert.equal(delay, 15000, `attempt ${attempt}`);
  }
});

test("reconnectDelayMs is full jitter: anywhere in [0, bound]", () => {
  assert.equal(reconnectDelayMs(3, { random: fixed(0) }), 0, "zero is a legal delay");
  assert.equal(reconnectDelayMs(3, { random: fixed(0.25) }), 1000);
  // A seeded sequence spread over [0, 1): every delay stays inside the bound, and they differ.
  let seed = 42;
  const lcg = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  for (const attempt of [0, 2, 4, 8]) {
    const bound = Math.min(15000, 500 * 2 ** attempt);
    const delays = Array.from({ length: 200 }, () => reconnectDelayMs(attempt, { random: lcg }));
    assert.ok(delays.every((d) => d >= 0 && d <= bound), `attempt ${attempt} out of bounds`);
    assert.ok(new Set(delays).size > 150, "jitter must spread the delays");
    assert.ok(Math.min(...delays) < bound * 0.1 && Math.max(...delays) > bound * 0.9, "full range used");
  }
});

test("reconnectDelayMs with the real Math.random stays in bounds", () => {
  for (let i = 0; i < 500; i += 1) {
    const delay = reconnectDelayMs(2);
    assert.ok(delay >= 0 && delay <= 2000, String(delay));
  }
});

test("reconnectDelayMs treats negative or NaN attempts as the first, and clamps a bad random", () => {
  assert.equal(reconnectDelayMs(-3, { random: fixed(1) }), 500);
  assert.equal(reconnectDelayMs(Number.NaN, { random: fixed(1) }), 500);
  assert.equal(reconnectDelayMs(2.9, { random: fixed(1) }), 2000, "fractional attempts floor");
  assert.equal(reconnectDelayMs(1, { random: fixed(7) }), 1000, "random above 1 is clamped");
  assert.equal(reconnectDelayMs(1, { random: fixed(-1) }), 0, "random below 0 is clamped");
  assert.equal(reconnectDelayMs(1, { random: fixed(Number.NaN) }), 0);
});

test("closeAction: 4001 fetches a new token first", () => {
  assert.equal(closeAction(4001), "refresh-token");
});

test("closeAction: the 4000-4499 range reconnects", () => {
  for (const code of [4000, 4002, 4008, 4029, 4100, 4499]) assert.equal(closeAction(code), "reconnect", String(code));
});

test("closeAction: the 4500-4999 range stops", () => {
  for (const code of [4500, 4501, 4700, 4999]) assert.equal(closeAction(code), "stop", String(code));
});

test("closeAction: normal close and the client's own protocol faults stop", () => {
  for (const code of [1000, 1003, 1007, 1008]) assert.equal(closeAction(code), "stop", String(code));
});

test("closeAction: going away, abnormal, internal error, overload reconnect", () => {
  for (const code of [1001, 1006, 1011, 1013]) assert.equal(closeAction(code), "reconnect", String(code));
});

test("closeAction: 1009 (frame too big) reconnects: the connection is gone, the person stays online", () => {
  assert.equal(closeAction(1009), "reconnect");
});

test("closeAction: other abnormal or unknown closes reconnect", () => {
  for (const code of [1002, 1005, 1010, 1012, 1014, 1015, 3000, 3999, 5000, 0, undefined, Number.NaN]) {
    assert.equal(closeAction(code), "reconnect", String(code));
  }
});

test("closeAction: boundaries of the private ranges", () => {
  assert.equal(closeAction(3999), "reconnect");
  assert.equal(closeAction(4499), "reconnect");
  assert.equal(closeAction(4500), "stop");
  assert.equal(closeAction(4999), "stop");
});

test("refreshDelayMs: 30 s before expiry for long tokens, 80 % of the lifetime for short ones", () => {
  const now = 1_700_000_000_000;
  assert.equal(refreshDelayMs(now + 3_600_000, now), 3_570_000);
  assert.equal(refreshDelayMs(now + 60_000, now), 48_000);
  assert.equal(refreshDelayMs(now + 150_000, now), 120_000, "both rules meet at 150 s");
  assert.equal(refreshDelayMs(now + 151_000, now), 121_000);
  assert.equal(refreshDelayMs(now + 1000, now), 800);
});

test("refreshDelayMs: an expired or invalid expiry refreshes at once", () => {
  const now = 1_700_000_000_000;
  assert.equal(refreshDelayMs(now, now), 0);
  assert.equal(refreshDelayMs(now - 5000, now), 0);
  assert.equal(refreshDelayMs(Number.NaN, now), 0);
});

test("checkOutgoing accepts a message at the character limit", () => {
  const message = "a".repeat(2000);
  assert.equal(checkOutgoing(JSON.stringify({ type: "chat", room: "lobby", message }), message), null);
});

test("checkOutgoing refuses one character over the limit, with counts", () => {
  const message = "a".repeat(2001);
  assert.equal(checkOutgoing(JSON.stringify({ message }), message), "Message too long (2001 of 2000 characters)");
});

test("checkOutgoing counts code points, not UTF-16 units", () => {
  const message = "😀".repeat(2000); // 4000 UTF-16 units, 2000 characters, 8000 UTF-8 bytes
  assert.equal(checkOutgoing(JSON.stringify({ message }), message, DEFAULT_LIMITS), null);
});

test("checkOutgoing refuses a frame over the byte cap measured in UTF-8", () => {
  const message = "é".repeat(10); // 10 characters, 20 bytes
  const frame = JSON.stringify({ type: "chat", room: "lobby", message });
  const bytes = new TextEncoder().encode(frame).length;
  const limits = { max_message_bytes: bytes - 1, max_chat_chars: 2000 };
  assert.equal(checkOutgoing(frame, message, limits), `Message too long (${bytes} of ${bytes - 1} bytes)`);
  assert.equal(checkOutgoing(frame, message, { ...limits, max_message_bytes: bytes }), null);
  assert.ok(bytes > frame.length, "bytes, not JavaScript string length");
});

test("errorText: rate limits say when to try again, rounded up", () => {
  const text = errorText({ type: "error", code: "rate_limited", message: "x", retry_after_ms: 2100 });
  assert.equal(text, "You're sending too fast — try again in 3 s");
  assert.match(errorText({ code: "rate_limited", message: "x" }), /try again in 1 s$/);
  assert.match(errorText({ code: "rate_limited", message: "x", retry_after_ms: 0 }), /try again in 1 s$/);
});

test("errorText: every error code has a human text", () => {
  for (const code of ["invalid_message", "forbidden_room", "not_joined", "invalid_json", "unavailable"]) {
    const text = errorText({ code, message: "" });
    assert.ok(text.length > 10 && !text.includes(code), `${code}: ${text}`);
  }
  assert.equal(errorText({ code: "invalid_message", message: "message is too long" }),
    "Message not accepted: message is too long");
  assert.equal(errorText({ code: "unavailable", retry_after_ms: 1500 }).endsWith("try again in 2 s"), true);
  assert.equal(errorText({ code: "brand_new", message: "Server says hi" }), "Server says hi");
  assert.equal(errorText({ code: "__proto__" }), "Something went wrong.");
  assert.equal(errorText({ code: "toString", message: { evil: true } }), "Something went wrong.");
});

test("typingText names one, two, or several people", () => {
  assert.equal(typingText([]), "");
  assert.equal(typingText(["Alice"]), "Alice is typing…");
  assert.equal(typingText(["Alice", "Bob"]), "Alice and Bob are typing…");
  assert.equal(typingText(["Alice", "Bob", "Carol", "Dan"]), "Alice, Bob and 2 more are typing…");
});

test("jwtExpiryMs reads exp from a base64url payload and survives garbage", () => {
  const payload = Buffer.from(JSON.stringify({ sub: "u1", exp: 1_700_000_000, name: "é?>" })).toString("base64url");
  assert.equal(jwtExpiryMs(`h.${payload}.s`), 1_700_000_000_000);
  const noExp = Buffer.from(JSON.stringify({ sub: "u1" })).toString("base64url");
  assert.equal(jwtExpiryMs(`h.${noExp}.s`), null);
  for (const bad of ["", "abc", "a.!!!.c", "a.bnVsbA.c", undefined]) assert.equal(jwtExpiryMs(bad), null, String(bad));
});
