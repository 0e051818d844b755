// Unit tests of moreMembersText (static/app.js): the line under a large room's sample member list.
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";

import { moreMembersText } from "../../static/app.js";

test("a sample smaller than the room says how many more there are", () => {
  assert.equal(moreMembersText(10_000, 100), "and 9900 more");
  assert.equal(moreMembersText(3, 2), "and 1 more");
});

test("a whole list needs no line", () => {
  assert.equal(moreMembersText(2, 2), "");
  assert.equal(moreMembersText(0, 0), "");
});

test("a count behind the list (presence arrived before the next room update) shows no line", () => {
  assert.equal(moreMembersText(100, 101), "");
});

test("anything but whole numbers shows no line", () => {
  for (const [total, shown] of [[undefined, 2], [null, 0], ["12", 2], [Number.NaN, 1], [2.5, 1], [5, "1"]]) {
    assert.equal(moreMembersText(total, shown), "");
  }
});
