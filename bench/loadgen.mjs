// The load generator of `make bench`: one Node process holding every client connection.
//
// bench/run.py starts it (pinned to its own core) and drives it with one JSON command per line
// on stdin; each command is answered by one JSON line on stdout. Progress goes to stderr.
//
//   {"cmd": "connect", "url", "count", "tokens"?, "origin"?, "room"?, "protocol"?, "concurrency",
//    "timeout_s"}
//       open `count` more clients (all at once when concurrency is 0), each waiting for
//       `welcome` and, with a room, for `joined`; answers the outcome of every attempt. With
//       `protocol` (the gateway's "chat.batch.v1"), each offers that subprotocol, and reads a
//       frame that is a JSON array as that many messages (docs/protocol.md, Batched delivery).
//   {"cmd": "publish", "room", "publishers", "mode": "closed"|"rate", "rate_per_s"?, "seconds",
//    "message_chars", "drain_s"}
//       the last `publishers` joined clients publish into `room` for `seconds`: in a closed
//       loop (the next chat once the publisher got its own copy back) or each at `rate_per_s`;
//       then wait up to `drain_s` for the last deliveries. Answers deliveries, loss, latency.
//   {"cmd": "close_all"}   close every client (1000) and forget them.
//   {"cmd": "exit"}
//
// The wire protocol is the gateway's (docs/protocol.md): welcome, join -> joined, chat -> chat
// to every member with `ref` echoed on the sender's copy. Each chat's text starts with a tag,
// BENCH:<phase>:<publisher>:<seq>:<sent ms>: padded to `message_chars`, so a subscriber finds
// the send time (performance.now() of this same process: one clock) without parsing JSON (a
// batch, a JSON array, is parsed).

import { performance } from "node:perf_hooks";
import { createInterface } from "node:readline";
import { WebSocket } from "ws";

const TAG = "BENCH:";
const ECHO_TIMEOUT_MS = 5000;
const QUIET_MS = 1000;

/** @type {Client[]} */
let clients = [];
let phaseCounter = 0;
/** The running publish phase, or null. */
let phase = null;
/** The running connect command's tally, or null. */
let connecting = null;

function progress(text) {
  process.stderr.write(`  loadgen: ${text}\n`);
}

function bump(counts, key) {
  counts[key] = (counts[key] ?? 0) + 1;
}

class Client {
  constructor(index) {
    this.index = index;
    this.ws = null;
    this.open = false;
    this.joined = false;
    this.room = null;
    this.closeCode = null;
    /** Reached welcome (and joined, with a room). */
    this.ok = false;
    /** Settles the connect attempt: resolve(outcome) once. */
    this.settle = null;
    /** For a closed-loop publisher: the seq it waits for, and how to wake it. */
    this.waitingSeq = -1;
    this.wake = null;
    this.publisherIndex = -1;
  }

  /** Connect, await welcome and (with a room) joined; resolve with the attempt's outcome. */
  start(url, headers, room, handshakeTimeoutMs, protocol) {
    this.room = room;
    return new Promise((resolve) => {
      this.settle = (outcome) => {
        if (this.settle !== null) {
          this.settle = null;
          resolve(outcome);
        }
      };
      const ws = new WebSocket(url, protocol ? [protocol] : [], {
        headers,
        perMessageDeflate: false,
        handshakeTimeout: handshakeTimeoutMs,
        skipUTF8Validation: true,
      });
      this.ws = ws;
      ws.on("unexpected-response", (request, response) => {
        response.resume();
        request.destroy();
        this.settle?.({ refused: response.statusCode });
      });
      ws.on("open", () => {
        this.open = true;
      });
      ws.on("message", (data) => this.onMessage(data));
      ws.on("error", (error) => {
        this.settle?.({ error: error.code ?? error.message });
      });
      ws.on("close", (code) => {
        const wasOpen = this.open;
        this.open = false;
        this.joined = false;
        this.closeCode = code;
        if (wasOpen) {
          this.settle?.({ closed: code });
          if (phase !== null) bump(phase.closes, String(code));
          else if (connecting !== null && this.ok) bump(connecting.dropped, String(code));
        }
        if (this.wake !== null) this.wake();
      });
    });
  }

  onMessage(data) {
    const at = data[0] === 0x5b ? -1 : data.indexOf(TAG); // "[": a batch
    if (at >= 0) {
      if (phase !== null) phase.chatFrames += 1;
      this.onChat(data.toString("latin1", at + TAG.length, at + TAG.length + 64), () =>
        data.indexOf('"ref"') >= 0,
      );
      return;
    }
    let message;
    try {
      message = JSON.parse(data.toString());
    } catch {
      if (phase !== null) bump(phase.errors, "unparsable frame");
      return;
    }
    if (!Array.isArray(message)) {
      this.onParsed(message);
      return;
    }
    if (phase !== null && message.some(isBenchChat)) phase.chatFrames += 1;
    for (const each of message) {
      if (isBenchChat(each)) this.onChat(each.message.slice(TAG.length, TAG.length + 64), () => "ref" in each);
      else this.onParsed(each);
    }
  }

  onParsed(message) {
    switch (message.type) {
      case "welcome":
        if (this.room === null) this.settle?.("ok");
        else this.ws.send(JSON.stringify({ type: "join", room: this.room, ref: "join" }));
        break;
      case "joined":
        if (message.room === this.room) {
          this.joined = true;
          this.settle?.("ok");
        }
        break;
      case "error":
        if (phase !== null) {
          bump(phase.errors, message.code);
          // A refused chat (the server pushing back on its publisher) is not expected anywhere.
          if (this.publisherIndex >= 0 && /^c\d+$/.test(message.ref ?? "")) {
            phase.refusedChats.add(`${this.publisherIndex}:${message.ref.slice(1)}`);
          }
          if (this.wake !== null && message.ref === `c${this.waitingSeq}`) this.wake();
        } else {
          this.settle?.({ error: `error frame ${message.code}` });
        }
        break;
      default: // presence, typing, pong, stale chats: not measured
        break;
    }
  }

  /** A chat of ours: `tagged` is its text after the tag; `hasRef()` whether it carries a ref. */
  onChat(tagged, hasRef) {
    const now = performance.now();
    const current = phase;
    if (current === null) return;
    const fields = tagged.split(":");
    if (Number(fields[0]) !== current.id) return; // a late frame from an earlier phase
    const publisher = Number(fields[1]);
    const seq = Number(fields[2]);
    current.latencies.push(now - Number(fields[3]));
    current.deliveries += 1;
    current.lastDeliveryAt = now;
    const counts = current.received[publisher];
    if (counts !== undefined && seq < counts.length) counts[seq] += 1;
    if (publisher === this.publisherIndex) {
      if (!hasRef()) bump(current.errors, "own copy without ref");
      if (seq === this.waitingSeq && this.wake !== null) this.wake();
    }
  }
}

function isBenchChat(message) {
  return message?.type === "chat" && typeof message.message === "string" && message.message.startsWith(TAG);
}

function headersFor(index, token, origin) {
  const headers = {
    // As if a TLS proxy in front forwarded a distinct client address per connection.
    "X-Forwarded-For": `10.${(index >> 16) & 255}.${(index >> 8) & 255}.${index & 255}`,
  };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (origin) headers.Origin = origin;
  return headers;
}

async function connect(command) {
  const { url, count, tokens, origin, room, protocol } = command;
  const concurrency = command.concurrency > 0 ? command.concurrency : count;
  const timeoutMs = command.timeout_s * 1000;
  const started = performance.now();
  const deadline = started + timeoutMs;
  // closed: before welcome/joined; dropped: closed after it, while this command runs.
  const outcome = { ok: 0, refused: {}, closed: {}, dropped: {}, errors: {}, timed_out: 0 };
  connecting = outcome;
  const fresh = [];
  let lastOkAt = started;
  let next = 0;
  let done = 0;

  const reportEvery = Math.max(1, Math.floor(count / 5));
  async function worker() {
    while (next < count) {
      const i = next++;
      const client = new Client(clients.length + fresh.length);
      fresh.push(client);
      const remaining = deadline - performance.now();
      if (remaining <= 0) {
        outcome.timed_out += 1;
        continue;
      }
      const token = tokens ? tokens[i] : null;
      let timer;
      const timeout = new Promise((resolve) => {
        timer = setTimeout(() => resolve("timeout"), remaining);
      });
      const headers = headersFor(client.index, token, origin);
      const attempt = client.start(url, headers, room, remaining, protocol);
      const result = await Promise.race([attempt, timeout]);
      clearTimeout(timer);
      if (result === "ok") {
        client.ok = true;
        outcome.ok += 1;
        lastOkAt = performance.now();
      } else if (result === "timeout") {
        outcome.timed_out += 1;
        client.settle = null;
        client.ws.terminate();
      } else if (result.refused !== undefined) bump(outcome.refused, String(result.refused));
      else if (result.closed !== undefined) bump(outcome.closed, String(result.closed));
      else bump(outcome.errors, String(result.error));
      done += 1;
      if (done % reportEvery === 0) progress(`${done}/${count} attempts settled`);
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  connecting = null;
  clients = clients.concat(fresh);
  const finished = performance.now();
  return {
    event: "connected",
    ...outcome,
    attempted: count,
    elapsed_s: (finished - started) / 1000,
    until_last_ok_s: (lastOkAt - started) / 1000,
  };
}

function percentile(sorted, fraction) {
  if (sorted.length === 0) return null;
  const index = Math.min(sorted.length - 1, Math.ceil(fraction * sorted.length) - 1);
  return sorted[Math.max(0, index)];
}

function chatText(phaseId, publisher, seq, chars) {
  const head = `${TAG}${phaseId}:${publisher}:${seq}:${performance.now().toFixed(3)}:`;
  return head.length >= chars ? head : head + "x".repeat(chars - head.length);
}

function sendChat(client, current, room, chars) {
  const seq = current.received[client.publisherIndex].length;
  current.received[client.publisherIndex].push(0);
  const text = chatText(current.id, client.publisherIndex, seq, chars);
  client.ws.send(`{"type":"chat","room":"${room}","message":"${text}","ref":"c${seq}"}`);
  current.sent += 1;
  return seq;
}

async function closedLoop(client, current, room, chars, endAt) {
  while (client.open && performance.now() < endAt) {
    const seq = sendChat(client, current, room, chars);
    client.waitingSeq = seq;
    await new Promise((resolve) => {
      const timer = setTimeout(() => {
        bump(current.errors, "echo timeout");
        resolve();
      }, ECHO_TIMEOUT_MS);
      client.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    client.wake = null;
    client.waitingSeq = -1;
  }
}

async function rateLoop(client, current, room, chars, startAt, endAt, intervalMs, offsetMs) {
  let due = startAt + offsetMs;
  while (client.open && due < endAt) {
    const wait = due - performance.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    // Behind schedule (a busy loop), send what is due: the offered rate stays the same.
    while (client.open && due <= performance.now() && due < endAt) {
      sendChat(client, current, room, chars);
      due += intervalMs;
    }
  }
}

async function publish(command) {
  const { room, mode, seconds, message_chars: chars } = command;
  const members = clients.filter((client) => client.open && client.joined);
  const publishers = members.slice(Math.max(0, members.length - command.publishers));
  phaseCounter += 1;
  const current = {
    id: phaseCounter,
    sent: 0,
    deliveries: 0,
    chatFrames: 0,
    latencies: [],
    received: publishers.map(() => []),
    closes: {},
    errors: {},
    refusedChats: new Set(),
    lastDeliveryAt: null,
  };
  publishers.forEach((client, index) => {
    client.publisherIndex = index;
  });
  phase = current;
  const startAt = performance.now();
  const endAt = startAt + seconds * 1000;
  if (mode === "closed") {
    await Promise.all(publishers.map((c) => closedLoop(c, current, room, chars, endAt)));
  } else {
    const intervalMs = 1000 / command.rate_per_s;
    await Promise.all(
      publishers.map((c, index) => {
        const offsetMs = (index * intervalMs) / publishers.length;
        return rateLoop(c, current, room, chars, startAt, endAt, intervalMs, offsetMs);
      }),
    );
  }
  const publishedAt = performance.now();
  // Drain: until every delivery arrived, nothing arrived for QUIET_MS, or drain_s passed.
  const drainEnd = publishedAt + command.drain_s * 1000;
  let expected;
  for (;;) {
    expected = (current.sent - current.refusedChats.size) * members.length;
    const now = performance.now();
    const quietSince = current.lastDeliveryAt ?? publishedAt;
    if (current.deliveries >= expected || now >= drainEnd || now - quietSince >= QUIET_MS) break;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const endedAt = current.deliveries >= expected ? current.lastDeliveryAt : performance.now();
  phase = null;
  for (const client of publishers) client.publisherIndex = -1;
  const latencies = Float64Array.from(current.latencies).sort();
  let incomplete = 0;
  current.received.forEach((counts, publisher) => {
    counts.forEach((count, seq) => {
      if (count < members.length && !current.refusedChats.has(`${publisher}:${seq}`)) {
        incomplete += 1;
      }
    });
  });
  const elapsedS = Math.max(1e-9, ((endedAt ?? publishedAt) - startAt) / 1000);
  return {
    event: "published",
    members: members.length,
    publishers: publishers.length,
    sent: current.sent,
    refused_chats: current.refusedChats.size,
    expected,
    deliveries: current.deliveries,
    chat_frames: current.chatFrames,
    incomplete_messages: incomplete,
    publish_s: (publishedAt - startAt) / 1000,
    elapsed_s: elapsedS,
    p50_ms: percentile(latencies, 0.5),
    p99_ms: percentile(latencies, 0.99),
    max_ms: latencies.length ? latencies[latencies.length - 1] : null,
    closes: current.closes,
    errors: current.errors,
    still_open: members.filter((client) => client.open).length,
  };
}

async function closeAll() {
  const open = clients.filter((client) => client.open);
  await new Promise((resolve) => {
    let left = open.length;
    if (left === 0) resolve();
    const timer = setTimeout(resolve, 5000);
    for (const client of open) {
      client.ws.once("close", () => {
        left -= 1;
        if (left === 0) {
          clearTimeout(timer);
          resolve();
        }
      });
      client.ws.close(1000);
    }
  });
  for (const client of clients) if (client.ws !== null) client.ws.terminate();
  const closed = clients.length;
  clients = [];
  return { event: "closed", clients: closed, open_before: open.length };
}

async function handle(command) {
  switch (command.cmd) {
    case "connect":
      return connect(command);
    case "publish":
      return publish(command);
    case "close_all":
      return closeAll();
    case "exit":
      return { event: "bye" };
    default:
      throw new Error(`unknown command ${JSON.stringify(command.cmd)}`);
  }
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let reply;
  let command = {};
  try {
    command = JSON.parse(line);
    reply = await handle(command);
  } catch (error) {
    reply = { event: "failed", error: String(error?.stack ?? error) };
  }
  process.stdout.write(`${JSON.stringify(reply)}\n`);
  if (command.cmd === "exit") break;
}
for (const client of clients) client.ws?.terminate();
process.exit(0);
