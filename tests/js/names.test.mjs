// defaultName mirrors gateway/auth.py default_name: the name a sign-in link shows for a token
// without a name claim must be the one the server will use (tests/test_auth.py has the server's cases).
import { test } from "node:test";
import assert from "node:assert/strict";

import { defaultName } from "../../static/app.js";

const cases = [
  ["alice", "alice"],
  ["a".repeat(64), "a".repeat(64)],
  ["a".repeat(65) + "b", "a".repeat(64)], // cut to 64
  ["x".repeat(63) + "\u200dy", "x".repeat(63)], // a joiner left dangling at the cut goes
  ["x".repeat(64) + "\u200dy", "x".repeat(64)],
  ["n\u200cm", "n\u200cm"], // joiners inside a name stay
  ["\u{1F600}".repeat(70), "\u{1F600}".repeat(64)], // code points, not UTF-16 units
  ["é".repeat(100), "é".repeat(64)],
  ["\u202eevil", "user"], // a bidi override: no valid name
  ["a\u200bb", "user"], // a zero-width space
  ["   ", "user"], // blank
];

test("a token without a name claim shows the name the server gives it", () => {
  for (const [sub, name] of cases) assert.equal(defaultName(sub), name, JSON.stringify(sub));
});
