// Unit tests of overloadRetryMs and the `overloaded` error text (static/app.js): a chat the server refused
// because it is busy stays pending and is sent again after the server's advice, a bounded number of times.
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";

import { OVERLOAD_RETRIES, errorText, overloadRetryMs } from "../../static/app.js";

const busy = (retry) => ({ type: "error", code: "overloaded", message: "busy", retry_after_ms: retry, ref: "1" });

test("an overloaded chat goes again after the server's retry_after_ms", () => {
  assert.equal(overloadRetryMs(busy(750), 0), 750);
  assert.equal(overloadRetryMs(busy(0), 2), 0);
});

test("the advice is bounded, and a missing or bad one means a second", () => {
  assert.equal(overloadRetryMs(busy(10_000_000), 0), 30_000);
  for (const bad of [undefined, null, "soon", -5, Number.NaN, Infinity]) assert.equal(overloadRetryMs(busy(bad), 0), 1000);
});

test("after OVERLOAD_RETRIES tries the chat is given up", () => {
  assert.equal(overloadRetryMs(busy(500), OVERLOAD_RETRIES - 1), 500);
  assert.equal(overloadRetryMs(busy(500), OVERLOAD_RETRIES), null);
  assert.equal(overloadRetryMs(busy(500), undefined), null);
});

test("other errors are never retried by themselves", () => {
  for (const code of ["rate_limited", "unavailable", "invalid_message", "not_joined", undefined]) {
    assert.equal(overloadRetryMs({ ...busy(500), code }, 0), null);
  }
  assert.equal(overloadRetryMs(null, 0), null);
});

test("the notice says the server is busy and when the chat goes again", () => {
  assert.equal(errorText(busy(1500)), "The server is busy — sending again in 2 s");
});
