// Unit tests of framesOf (static/app.js): with batched delivery a server frame holds one message (a JSON
// object) or several (a JSON array of them, in order); anything else is ignored, never thrown.
// Run: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";

import { BATCH_PROTOCOL, framesOf } from "../../static/app.js";

test("the page offers the subprotocol the server's docs name", () => {
  assert.equal(BATCH_PROTOCOL, "chat.batch.v1");
});

test("one object is one message; an array is its messages, in order", () => {
  assert.deepEqual(framesOf('{"type":"pong"}'), [{ type: "pong" }]);
  assert.deepEqual(framesOf('[{"type":"chat","id":1},{"type":"chat","id":2}]'), [
    { type: "chat", id: 1 },
    { type: "chat", id: 2 },
  ]);
});

test("what is not a message is dropped, not thrown", () => {
  for (const text of ["", "nope", "null", "3", '"x"', "[]", "[[1]]", "[null]", "{"]) {
    assert.deepEqual(framesOf(text), [], text);
  }
  assert.deepEqual(framesOf('[1,{"type":"pong"},null]'), [{ type: "pong" }]);
});
