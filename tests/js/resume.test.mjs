// Unit tests of insertionIndex (static/app.js): a room's messages read in id order whatever order their
// frames came in (a replay after a reconnect, an acknowledgement after others' messages); own messages not
// acknowledged yet (no id) stay where they are.
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";

import { errorText, insertionIndex } from "../../static/app.js";

test("a message goes after every smaller id", () => {
  assert.equal(insertionIndex([], 5), 0);
  assert.equal(insertionIndex([1, 2, 3], 4), 3);
  assert.equal(insertionIndex([1, 2, 4], 3), 2);
  assert.equal(insertionIndex([2, 3], 1), 0);
});

test("pending own messages (no id yet) are a wall: nothing is put before them", () => {
  assert.equal(insertionIndex([1, null, 5], 3), 2);
  assert.equal(insertionIndex([1, 5, null], 3), 3);
});

test("the notice for a room whose ids restarted says what happened", () => {
  assert.match(errorText({ type: "error", code: "since_ahead", message: "x" }), /lost this room's earlier messages/);
});
