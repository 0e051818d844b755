// Gateway chat: the browser client of the WebSocket gateway (wire contract: docs/protocol.md).
// One ES module, no build step, no external resources; every piece of data is rendered with textContent.
//
// Stable hooks for end-to-end tests:
//   #conn-state[data-state=connecting|connected|disconnected|reconnecting]  (hidden while nobody is signed in) text "Connecting…", "Connected",
//                    "Disconnected", "Reconnecting in N s…"
//   #notice (role=status)[data-code=<error code>|too_long|outbox_full|session-expired|close-<code>|signin|link-expired|
//                    link-invalid|""]
//   #live            visually hidden live region: every connection state change
//   #signin-panel, #signin (form), #signin-name (hidden when the token URL is the operator's: it knows the name),
//                    #signin-submit
//   <meta name="gateway-token-url" content=URL data-mode=dev|session>: where tokens come from (the server fills
//                    it in): "dev" POSTs {name, sub} to /dev/token; "session" POSTs nothing to the operator's URL
//                    with the user's cookies (401/403: not signed in there), and signs in on load
//   #link-signin-panel (a #token=... link: shown instead of connecting), #link-signin-heading,
//                    #link-signin-name, #link-signin-sub (the token's name and sub claims),
//                    #link-signin-continue (text "Continue as <name>", the name in #link-signin-continue-name),
//                    #link-signin-cancel
//   #chat (hidden until signed in), #me[data-user-id], #signout, #reconnect (shown after a "stop" close)
//   #rooms > li > button.room[data-room][data-joined=true|false][aria-current=true on the active room]
//   #current-room[data-room], #leave-room, #members > li[data-user-id], #member-count, #typing
//   #members > li.members-more (no data-user-id): only in a large room, whose list is a sample: "and N more",
//                    N being #member-count (the room's users, from the server's member_count) less those listed
//   #messages > li.gap[data-room]: where history did not reach back (messages missed while away are not shown)
//   #messages (role=log, aria-live=polite) > li.msg[data-room][data-user-id][data-own=true|false]
//                    [data-status=pending|sent|failed][data-ref (own messages)][data-id (once acknowledged)]
//                    children .msg-from, time.msg-time, .msg-status ("sending…", "not sent"), .msg-text
//   #composer (form), #message-input, #send-button
//   window.chatClient: reconnectDelayMs, closeAction, refreshDelayMs, checkOutgoing, typingText, errorText, maxPending,
//                    reconnectDelays (every backoff delay scheduled, ms), reconnectOptions ({baseMs, capMs,
//                    stableMs, random?}: read at each use; a window.chatClient.reconnectOptions set by an
//                    init script before this module runs is merged in), state (read-only snapshot).

export const DEFAULT_LIMITS = Object.freeze({ max_message_bytes: 16384, max_chat_chars: 2000 });
const STABLE_MS = 10_000; // default stableMs: a connection this old resets the backoff (not on open: avoids
// accept-then-close loops)
const [TYPING_EVERY_MS, TYPING_IDLE_MS, TYPING_SHOWN_MS] = [2000, 3000, 5000];
const [PING_EVERY_MS, PONG_WAIT_MS, MAX_LOG] = [25_000, 10_000, 500];
const HISTORY_ON_JOIN = 50; // a newcomer's context: the room's last chats
// The outbox: own messages sent and not acknowledged yet, resent (same ref) after a reconnect; at most this many.
export const MAX_PENDING = 100;
const ROOM_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
const STOP_CODES = new Set([1000, 1003, 1007, 1008]);

/** Full-jitter exponential backoff: random() * min(capMs, baseMs * 2**attempt). */
export function reconnectDelayMs(attempt, { baseMs = 500, capMs = 15000, random = Math.random } = {}) {
  const n = attempt > 0 ? Math.floor(attempt) : 0; // NaN and negatives count as the first attempt
  const r = Math.min(Math.max(Number(random()) || 0, 0), 1);
  return r * Math.min(capMs, baseMs * 2 ** n);
}

/** What a close code means for this client: "reconnect", "refresh-token" or "stop". */
export function closeAction(code) {
  if (code === 4001) return "refresh-token"; // token expired: fetch a new one, then reconnect at once
  if (code >= 4500 && code <= 4999) return "stop"; // the gateway's "do not come back" range
  if (STOP_CODES.has(code)) return "stop"; // normal / sign-out, binary frame, invalid UTF-8, policy
  // 4000-4499 (4008 too slow, 4029 rate abuse), 1001 going away, 1006 abnormal (network lost or the
  // upgrade refused), 1011 internal error, 1013 try later, and any other abnormal close: reconnect.
  // 1009 (frame over the cap) is this page's own fault (it checks sizes before sending, so it should
  // not happen), yet the connection is lost either way and stopping would leave the person offline
  // for good: reconnect with backoff and show a message saying what happened.
  return "reconnect";
}

/** A token's display name when it has no name claim, as the server makes it (gateway/auth.py default_name): the
 * sub cut to 64 code points (a joiner left dangling at the cut goes too), or "user" when that is no valid name. */
export function defaultName(sub) {
  const chars = Array.from(sub);
  let name = chars.slice(0, 64).join("");
  if (chars.length > 64) name = name.replace(/[\u200c\u200d]+$/u, "");
  const bad = /[\p{Cc}\p{Cs}]|(?![\u200c\u200d])\p{Cf}/u;
  return name.trim() && !bad.test(name) ? name : "user";
}

/** When to refresh a token: ~30 s before expiry, or at 80 % of the remaining lifetime if it is short. */
export function refreshDelayMs(expiresAtMs, nowMs, { leadMs = 30000 } = {}) {
  const lifetimeMs = expiresAtMs - nowMs;
  if (!(lifetimeMs > 0)) return 0;
  return lifetimeMs > 5 * leadMs ? lifetimeMs - leadMs : 0.8 * lifetimeMs;
}

/** Null when the chat frame may be sent, else the human reason it may not (limits from welcome). */
export function checkOutgoing(frameText, message, limits = DEFAULT_LIMITS) {
  const chars = [...message].length; // code points, as the server's JSON Schema maxLength counts them
  if (chars > limits.max_chat_chars) return `Message too long (${chars} of ${limits.max_chat_chars} characters)`;
  const bytes = new TextEncoder().encode(frameText).length;
  if (bytes > limits.max_message_bytes) return `Message too long (${bytes} of ${limits.max_message_bytes} bytes)`;
  return null;
}

// Batched delivery (docs/protocol.md): offered as a WebSocket subprotocol; a server frame then holds one
// message (a JSON object) or several (a JSON array of them, in order).
export const BATCH_PROTOCOL = "chat.batch.v1";
export function framesOf(text) {
  let data = null;
  try { data = JSON.parse(text); } catch { return []; }
  const isMessage = (m) => m !== null && typeof m === "object" && !Array.isArray(m);
  if (Array.isArray(data)) return data.filter(isMessage);
  return isMessage(data) ? [data] : [];
}

// Resume (docs/protocol.md, History and resume): where a message with chat id `id` goes among a room's
// messages, given their ids in display order (null: an own message not acknowledged yet, which stays put):
// after every message with a smaller id, so a room reads in id order whatever order frames came in.
export function insertionIndex(ids, id) {
  let at = ids.length;
  while (at > 0 && ids[at - 1] != null && ids[at - 1] > id) at -= 1;
  return at;
}

/** The line under a large room's sample list: "and N more" when `total` users outnumber the `shown` ones. */
export function moreMembersText(total, shown) {
  const more = Number.isInteger(total) && Number.isInteger(shown) ? total - shown : 0;
  return more > 0 ? `and ${more} more` : "";
}

export function typingText(names) {
  if (names.length === 0) return "";
  if (names.length === 1) return `${names[0]} is typing…`;
  if (names.length === 2) return `${names[0]} and ${names[1]} are typing…`;
  return `${names[0]}, ${names[1]} and ${names.length - 2} more are typing…`;
}

/** How many times a chat refused as `overloaded` is sent again before it shows "not sent". */
export const OVERLOAD_RETRIES = 5;

/** When to send again a chat refused with `frame` (an `overloaded` error) after `tries` tries: the server's
 * `retry_after_ms` (1 s when absent or not a number, at most 30 s), or null once the tries are used up. */
export function overloadRetryMs(frame, tries) {
  if (frame?.code !== "overloaded" || !(tries < OVERLOAD_RETRIES)) return null;
  const ms = frame.retry_after_ms;
  return typeof ms === "number" && Number.isFinite(ms) && ms >= 0 ? Math.min(ms, 30_000) : 1000;
}

/** The human text of an `error` frame. */
export function errorText(frame) {
  const seconds = Math.max(1, Math.ceil((Number(frame.retry_after_ms) || 1000) / 1000));
  const detail = typeof frame.message === "string" && frame.message ? frame.message : "";
  const texts = {
    rate_limited: `You're sending too fast — try again in ${seconds} s`,
    invalid_message: detail ? `Message not accepted: ${detail}` : "Message not accepted.",
    forbidden_room: "You are not allowed in that room.",
    not_joined: "You are not in that room: join it first.",
    invalid_json: "The server could not read a message from this page.",
    unavailable: `The server could not pass that on just now — try again in ${seconds} s`,
    since_ahead: "The server lost this room's earlier messages (it restarted).",
    overloaded: `The server is busy — sending again in ${seconds} s`,
  };
  return Object.hasOwn(texts, frame.code) ? texts[frame.code] : detail || "Something went wrong.";
}

/** A JWT's {sub, name, exp (s)}, read without verifying (the server verifies): each null when absent or not
 * of its type (an empty string counts as absent); null when the payload is not base64url UTF-8 JSON of an object. */
export function jwtClaims(token) {
  try {
    const parts = token.split(".");
    if (parts.length !== 3) return null;
    const bytes = Uint8Array.from(atob(parts[1].replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));
    const p = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
    if (typeof p !== "object" || p === null || Array.isArray(p)) return null;
    const text = (v) => (typeof v === "string" && v ? v : null);
    return { sub: text(p.sub), name: text(p.name), exp: Number.isFinite(p.exp) ? p.exp : null };
  } catch { return null; }
}

/** The `exp` of a JWT in ms, read without verifying (the server verifies); null when absent. */
export function jwtExpiryMs(token) {
  const exp = jwtClaims(token)?.exp;
  return exp == null ? null : exp * 1000;
}

const STOP_TEXT = {
  1000: "Disconnected.",
  1003: "The server refused data it cannot read.",
  1007: "The server received text that was not valid UTF-8.",
  1008: "Disconnected after repeated invalid messages.",
};
const SIGNED_OUT_TEXT = "You are not signed in to this site: sign in, then choose Join chat.";
const RECONNECT_TEXT = {
  1009: "A message was too large for the server; reconnecting.",
  1011: "The server had an internal error; reconnecting.",
  1013: "The server is overloaded; retrying shortly.",
  4008: "The connection was too slow to keep up; reconnecting.",
  4029: "Too many messages too fast; reconnecting.",
};

if (typeof document !== "undefined") startApp();

function startApp() {
  const $ = (id) => document.getElementById(id);
  const tokenMeta = document.querySelector('meta[name="gateway-token-url"]');
  const TOKEN = { url: tokenMeta?.content || "/dev/token", session: tokenMeta?.dataset.mode === "session" };
  const ui = {
    signinPanel: $("signin-panel"), signin: $("signin"), name: $("signin-name"), signinSubmit: $("signin-submit"),
    chat: $("chat"), me: $("me"), signout: $("signout"), reconnect: $("reconnect"), conn: $("conn-state"),
    live: $("live"), notice: $("notice"), rooms: $("rooms"), currentRoom: $("current-room"), leave: $("leave-room"),
    members: $("members"), memberCount: $("member-count"), typing: $("typing"), log: $("messages"),
    composer: $("composer"), input: $("message-input"), send: $("send-button"), linkPanel: $("link-signin-panel"),
    linkHeading: $("link-signin-heading"), linkName: $("link-signin-name"), linkSub: $("link-signin-sub"),
    linkContinue: $("link-signin-continue"), linkContinueName: $("link-signin-continue-name"),
    linkCancel: $("link-signin-cancel"),
  };
  const area = (name) => { try { return window[name]; } catch { return null; } };
  const local = area("localStorage");
  const session = area("sessionStorage");
  const get = (s, k) => { try { return s?.getItem(k) ?? null; } catch { return null; } };
  const put = (s, k, v) => { try { if (v == null) s?.removeItem(k); else s?.setItem(k, v); } catch { /* blocked */ } };
  const K = "gateway-chat.";
  const storedRooms = (() => { try { return JSON.parse(get(session, K + "rooms")); } catch { return null; } })();

  const S = {
    token: null, expiresAt: null, viaUrl: false, staleToken: false, name: "", sub: get(session, K + "sub"),
    user: null, connId: null, ws: null, welcomed: false, conn: "disconnected", attempt: 0,
    limits: { ...DEFAULT_LIMITS }, allowed: [], rooms: new Map(),
    wanted: new Set(Array.isArray(storedRooms) ? storedRooms.filter((r) => ROOM_RE.test(r)) : ["lobby"]),
    active: null, pending: new Map(), acked: new Set(), joinRefs: new Map(), seq: 0,
    typingAt: 0, typingRoom: null, refocus: false, gen: 0, t: {},
  };
  const refPrefix = Math.random().toString(36).slice(2, 8);
  const newRef = () => `${refPrefix}-${(++S.seq).toString(36)}`;
  const clear = (...names) => names.forEach((n) => { clearTimeout(S.t[n]); clearInterval(S.t[n]); S.t[n] = undefined; });
  let roomsKey = null;

  const api = {
    reconnectDelayMs, closeAction, refreshDelayMs, checkOutgoing, typingText, errorText,
    reconnectDelays: [],
    maxPending: MAX_PENDING, // read at each send
    reconnectOptions: { baseMs: 500, capMs: 15000, stableMs: STABLE_MS, ...window.chatClient?.reconnectOptions },
    get state() {
      return { conn: S.conn, attempt: S.attempt, user: S.user, active: S.active, joined: [...S.rooms.values()]
        .filter((r) => r.joined).map((r) => r.name), pending: S.pending.size, expiresAt: S.expiresAt };
    },
  };
  window.chatClient = api;

  // ---- presentation helpers ----
  const STATE_TEXT = { connecting: "Connecting…", connected: "Connected", disconnected: "Disconnected" };
  function setConn(state, text = STATE_TEXT[state], announce = true) {
    [S.conn, ui.conn.dataset.state, ui.conn.textContent] = [state, state, text];
    ui.conn.hidden = !S.token; // nobody signed in: no connection to speak of, no red badge
    if (announce) ui.live.textContent = text;
    ui.reconnect.hidden = !(state === "disconnected" && S.token);
    updateComposer();
  }
  function notify(text, code = "", sticky = false) {
    clear("notice");
    [ui.notice.textContent, ui.notice.dataset.code] = [text, code];
    if (text && !sticky) S.t.notice = setTimeout(() => notify(""), 10_000);
  }
  function node(tag, className = "", text = "") {
    return Object.assign(document.createElement(tag), { className, textContent: text });
  }
  function room(name) {
    let r = S.rooms.get(name);
    if (!r) {
      const btn = Object.assign(node("button", "room", `#${name}`), { type: "button" });
      btn.dataset.room = name;
      const item = node("li");
      item.append(btn);
      // count: the room's size while it is large (its members list is then a sample), else null.
      // lastId: the newest chat id seen (a rejoin asks for what followed it); ids: those shown (no duplicate).
      r = { name, joined: false, members: new Map(), count: null, typing: new Map(), log: [], btn, item,
        lastId: null, ids: new Set() };
      S.rooms.set(name, r);
    }
    return r;
  }
  const canSend = () => S.conn === "connected" && !!S.active && room(S.active).joined;
  function updateComposer() {
    const ok = canSend();
    if (!ok && document.activeElement === ui.input) S.refocus = true;
    ui.input.disabled = ui.send.disabled = ui.leave.disabled = !ok;
    const idle = !document.activeElement || document.activeElement === document.body;
    if (ok && S.refocus && idle) { S.refocus = false; ui.input.focus(); }
  }
  function renderRooms() {
    const key = S.allowed.join("\n");
    if (key !== roomsKey) { roomsKey = key; ui.rooms.replaceChildren(...S.allowed.map((n) => room(n).item)); }
    for (const name of S.allowed) {
      const r = room(name);
      r.btn.dataset.joined = String(r.joined);
      if (name === S.active) r.btn.setAttribute("aria-current", "true");
      else r.btn.removeAttribute("aria-current");
    }
  }
  function renderMembers() {
    const r = S.active ? room(S.active) : null;
    const users = r ? [...r.members.values()].sort((a, b) => String(a.name).localeCompare(String(b.name))) : [];
    const items = users.map((u) => {
      const me = u.id === S.user?.id;
      const li = node("li", me ? "member member--me" : "member", me ? `${u.name} (you)` : u.name);
      li.dataset.userId = u.id;
      return li;
    });
    const total = r?.count ?? users.length;
    const more = moreMembersText(total, users.length);
    if (more) items.push(node("li", "members-more", more));
    ui.members.replaceChildren(...items);
    ui.memberCount.textContent = String(total);
  }
  function renderTyping() {
    const r = S.active ? S.rooms.get(S.active) : null;
    ui.typing.textContent = r ? typingText([...r.typing.values()].map((t) => t.name)) : "";
  }
  function clearTyping(r, userId) {
    for (const [id, t] of r.typing) {
      if (userId === undefined || id === userId) { clearTimeout(t.timer); r.typing.delete(id); }
    }
    if (r.name === S.active) renderTyping();
  }
  function setActive(name) {
    if (S.typingRoom && S.typingRoom !== name) stopTyping();
    S.active = name;
    ui.log.replaceChildren(...(name ? room(name).log : []));
    ui.log.scrollTop = ui.log.scrollHeight;
    [ui.currentRoom.textContent, ui.currentRoom.dataset.room] = [name ? `#${name}` : "No room", name ?? ""];
    ui.input.placeholder = name ? `Message #${name}` : "";
    renderRooms(); renderMembers(); renderTyping(); updateComposer();
  }

  // ---- messages ----
  function fillMessage(li, f, status) {
    const from = f.from ?? { id: "", name: "?" };
    const d = new Date(Number.isFinite(f.ts) ? f.ts : Date.now());
    Object.assign(li.dataset, { status, userId: from.id, own: String(from.id === S.user?.id) });
    if (f.id != null) li.dataset.id = String(f.id);
    if (f.ref) li.dataset.ref = f.ref;
    li.querySelector(".msg-from").textContent = from.name;
    Object.assign(li.querySelector(".msg-time"), {
      dateTime: d.toISOString(), textContent: d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }),
    });
    li.querySelector(".msg-status").textContent = status === "pending" ? "sending…" : status === "failed" ? "not sent" : "";
    li.querySelector(".msg-text").textContent = f.message;
  }
  function makeMessage(f, status) {
    const li = node("li", "msg");
    const meta = node("div", "msg-meta");
    meta.append(node("span", "msg-from"), node("time", "msg-time"), node("span", "msg-status"));
    li.append(meta, node("p", "msg-text"));
    li.dataset.room = f.room;
    fillMessage(li, f, status);
    return li;
  }
  function addMessage(r, li, force = false) {
    const id = li.dataset.id ? Number(li.dataset.id) : null;
    const at = id == null ? r.log.length : insertionIndex(r.log.map((x) => (x.dataset.id ? Number(x.dataset.id) : null)), id);
    const before = r.log[at] ?? null;
    r.log.splice(at, 0, li);
    if (r.log.length > MAX_LOG) {
      const gone = r.log.shift();
      gone.remove();
      if (gone.dataset.id) r.ids.delete(Number(gone.dataset.id));
    }
    if (r.name !== S.active) return;
    const nearBottom = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
    ui.log.insertBefore(li, before && before.parentNode === ui.log ? before : null);
    if (force || nearBottom) ui.log.scrollTop = ui.log.scrollHeight;
  }
  function addGap(r, text) { // history did not reach back: some messages are not shown
    const li = node("li", "gap", text);
    li.dataset.room = r.name;
    addMessage(r, li);
  }
  function sawChat(r, f) { // false when this chat id is shown already (a replay of what was seen)
    if (!Number.isSafeInteger(f.id)) return true;
    if (r.lastId == null || f.id > r.lastId) r.lastId = f.id;
    if (r.ids.has(f.id)) return false;
    r.ids.add(f.id);
    return true;
  }
  function failPending(ref) {
    const p = S.pending.get(ref);
    if (!p) return;
    S.pending.delete(ref);
    fillMessage(p.el, { from: S.user, message: p.message, ts: p.ts, ref }, "failed");
    if (!ui.input.value && p.room === S.active) ui.input.value = p.message; // one Enter sends it again
  }

  // ---- the connection ----
  function send(frame) {
    if (S.ws?.readyState !== WebSocket.OPEN) return false;
    S.ws.send(JSON.stringify(frame));
    return true;
  }
  async function connect() {
    clear("reconnect", "countdown");
    if (!S.token || S.ws) return;
    const soon = S.expiresAt != null && S.expiresAt - Date.now() < 5000;
    if (S.viaUrl && (soon || S.staleToken)) {
      try { await fetchToken(); } catch (err) { return tokenFailed(err); }
      if (!S.token || S.ws) return;
    } else if (!S.viaUrl && S.expiresAt != null && S.expiresAt <= Date.now()) {
      return sessionExpired();
    }
    setConn("connecting");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try { ws = new WebSocket(`${scheme}//${location.host}/ws?access_token=${encodeURIComponent(S.token)}`, [BATCH_PROTOCOL]); }
    catch { return scheduleReconnect(); }
    [S.ws, S.welcomed] = [ws, false];
    ws.onmessage = (ev) => { if (S.ws === ws) onFrame(ev.data); };
    ws.onclose = (ev) => { if (S.ws === ws) onClose(ev.code); };
  }
  function onClose(code) {
    // Refused before welcome (e.g. 401 after a dev server restart): fetch a dev token again first.
    [S.ws, S.staleToken, S.typingRoom] = [null, !S.welcomed, null];
    clear("stable", "ping", "pong", "typingIdle");
    for (const r of S.rooms.values()) { [r.joined, r.count] = [false, null]; r.members.clear(); clearTyping(r); }
    renderRooms(); renderMembers();
    if (!S.token) return setConn("disconnected");
    const action = closeAction(code);
    if (action === "stop") {
      notify(STOP_TEXT[code] ?? `The server ended the session (code ${code}).`, `close-${code}`, true);
      return setConn("disconnected");
    }
    if (action === "refresh-token") return S.viaUrl ? renewThenReconnect() : sessionExpired();
    if (RECONNECT_TEXT[code]) notify(RECONNECT_TEXT[code], `close-${code}`);
    scheduleReconnect();
  }
  async function renewThenReconnect() {
    setConn("connecting");
    try { await fetchToken(); } catch (err) { return tokenFailed(err); }
    if (S.attempt > 0) return scheduleReconnect(); // a 4001 loop on unstable connections still backs off
    S.attempt = 1;
    connect();
  }
  function scheduleReconnect() {
    clear("reconnect", "countdown");
    const delay = reconnectDelayMs(S.attempt, api.reconnectOptions);
    S.attempt += 1;
    api.reconnectDelays.push(delay);
    const due = Date.now() + delay;
    const tick = (announce) => {
      const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setConn("reconnecting", `Reconnecting in ${seconds} s…`, announce);
    };
    tick(true);
    S.t.countdown = setInterval(tick, 1000, false);
    S.t.reconnect = setTimeout(connect, delay);
  }
  function sessionExpired(why = "") {
    [S.token, S.gen] = [null, S.gen + 1];
    clear("refresh", "reconnect", "countdown");
    setConn("disconnected");
    notify(why === "signed-out" ? SIGNED_OUT_TEXT : "Your session expired, sign in again.", "session-expired", true);
    showChat(false);
  }
  function dropDeadConnection() {
    const ws = S.ws;
    onClose(1006);
    try { ws?.close(4000, "no pong"); } catch { /* already closing */ }
  }

  // ---- tokens ----
  function tokenFailed(err) {
    if (err.message === "no-dev" || err.message === "signed-out") sessionExpired(err.message);
    else if (err.message !== "cancelled") scheduleReconnect();
  }
  async function fetchToken() {
    const gen = S.gen; // a sign-out while the request runs makes its answer void
    let res;
    if (TOKEN.session) {
      // The operator's own sign-in answers for whoever its cookie names: nothing to send.
      res = await fetch(TOKEN.url, { method: "POST", credentials: "include", headers: { Accept: "application/json" } });
      if (res.status === 401 || res.status === 403) throw new Error("signed-out");
    } else {
      const body = S.sub ? { name: S.name, sub: S.sub } : { name: S.name };
      res = await fetch(TOKEN.url, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      if (res.status === 404 || res.status === 405) throw new Error("no-dev");
    }
    if (!res.ok) throw new Error(`token endpoint answered ${res.status}`);
    const data = await res.json();
    if (gen !== S.gen) throw new Error("cancelled");
    if (typeof data?.token !== "string") throw new Error("no token in the answer");
    [S.token, S.viaUrl, S.staleToken] = [data.token, true, false];
    S.expiresAt = Number.isFinite(data.expires_at) ? data.expires_at : jwtExpiryMs(data.token);
    if (!TOKEN.session && data.user?.id != null) { S.sub = String(data.user.id); put(session, K + "sub", S.sub); }
    return data;
  }
  function scheduleRefresh() {
    clear("refresh");
    if (!S.viaUrl || S.expiresAt == null) return;
    const delay = Math.max(1000, refreshDelayMs(S.expiresAt, Date.now())); // floor: no loop on a skewed clock
    S.t.refresh = setTimeout(refreshToken, Math.min(delay, 2 ** 31 - 1));
  }
  async function refreshToken() {
    try { await fetchToken(); } catch {
      // Retry while the old token lasts; past that the server closes with 4001 and we renew then.
      if (S.token && S.expiresAt != null && S.expiresAt - Date.now() > 5000) S.t.refresh = setTimeout(refreshToken, 5000);
      return;
    }
    send({ type: "refresh", token: S.token, ref: newRef() });
    scheduleRefresh();
  }

  // ---- frames from the server ----
  const handlers = {
    welcome(f) {
      [S.welcomed, S.user, S.connId] = [true, f.user ?? { id: "", name: "" }, f.connection_id];
      S.limits = { ...DEFAULT_LIMITS, ...f.limits };
      S.allowed = Array.isArray(f.rooms) ? f.rooms.filter((r) => ROOM_RE.test(r)) : [];
      if (f.expires_at !== undefined) S.expiresAt = f.expires_at;
      scheduleRefresh();
      [ui.me.textContent, ui.me.dataset.userId] = [S.user.name, S.user.id];
      if (ui.notice.dataset.code?.startsWith("close-")) notify("");
      const stableMs = Number(api.reconnectOptions.stableMs);
      S.t.stable = setTimeout(() => { S.attempt = 0; }, stableMs >= 0 ? stableMs : STABLE_MS);
      S.t.ping = setInterval(() => {
        if (send({ type: "ping" }) && !S.t.pong) S.t.pong = setTimeout(dropDeadConnection, PONG_WAIT_MS);
      }, PING_EVERY_MS);
      for (const [ref, p] of S.pending) if (!S.allowed.includes(p.room)) failPending(ref);
      let targets = [...S.wanted].filter((r) => S.allowed.includes(r));
      if (!targets.length && S.allowed.length) targets = [S.allowed.includes("lobby") ? "lobby" : S.allowed[0]];
      setConn("connected");
      setActive(targets.includes(S.active) ? S.active : targets[0] ?? null);
      for (const name of targets) joinRoom(name);
    },
    joined(f) {
      const r = room(f.room);
      r.joined = true;
      // A repeated join of a room may answer `unchanged`: the list presence frames kept is current. A large
      // room's list is a sample (members_truncated), with the room's size in member_count.
      if (f.unchanged !== true) {
        r.members = new Map((Array.isArray(f.members) ? f.members : []).map((u) => [u.id, u]));
        r.count = f.members_truncated === true && Number.isInteger(f.member_count) ? f.member_count : null;
      }
      if (f.recovered === false) addGap(r, "Some earlier messages could not be loaded.");
      S.wanted.add(f.room);
      saveRooms();
      for (const [ref, p] of S.pending) {
        if (p.room === f.room && p.sentOn !== S.connId) { // resend what the last connection lost, same ref
          p.sentOn = S.connId;
          send({ type: "chat", room: p.room, message: p.message, ref });
        }
      }
      if (!S.active) setActive(f.room);
      else { renderRooms(); if (f.room === S.active) renderMembers(); updateComposer(); }
    },
    left(f) {
      const r = room(f.room);
      [r.joined, r.count] = [false, null];
      r.members.clear();
      clearTyping(r);
      S.wanted.delete(f.room);
      saveRooms();
      for (const [ref, p] of S.pending) if (p.room === f.room) failPending(ref);
      if (S.active === f.room) setActive([...S.rooms.values()].find((x) => x.joined)?.name ?? f.room);
      else renderRooms();
    },
    chat(f) {
      const r = room(f.room);
      clearTyping(r, f.from?.id);
      const p = f.ref ? S.pending.get(f.ref) : undefined;
      const fresh = sawChat(r, f); // false: this id is shown already (a replay overlapping what was seen)
      if (p) { // acknowledged: moved to its id's place among what arrived meanwhile
        S.pending.delete(f.ref); S.acked.add(f.ref);
        const i = r.log.indexOf(p.el);
        if (i >= 0) { r.log.splice(i, 1); p.el.remove(); }
        if (fresh) { fillMessage(p.el, f, "sent"); addMessage(r, p.el); return; }
      }
      if (!fresh) { // e.g. a resent chat whose first copy came back in a replay: that copy is the one
        const shown = r.log.find((x) => x.dataset.id === String(f.id));
        if (shown && f.ref) fillMessage(shown, f, "sent");
        return;
      }
      if (f.ref && S.acked.has(f.ref)) return; // a resent message acknowledged twice: show it once
      addMessage(r, makeMessage(f, "sent"));
    },
    presence(f) {
      const r = room(f.room);
      if (!f.user) return;
      if (f.event === "join") r.members.set(f.user.id, f.user);
      else if (f.event === "leave") { r.members.delete(f.user.id); clearTyping(r, f.user.id); }
      if (f.room === S.active) renderMembers();
    },
    room(f) { // a large room's size, coalesced; with `members` when it is small again: the whole list
      const r = room(f.room);
      if (!r.joined || !Number.isInteger(f.member_count)) return;
      if (Array.isArray(f.members)) [r.members, r.count] = [new Map(f.members.map((u) => [u.id, u])), null];
      else r.count = f.member_count;
      if (f.room === S.active) renderMembers();
    },
    typing(f) {
      if (!f.user || f.user.id === S.user?.id) return;
      const r = room(f.room);
      clearTyping(r, f.user.id);
      if (f.typing === true) {
        const timer = setTimeout(() => clearTyping(r, f.user.id), TYPING_SHOWN_MS);
        r.typing.set(f.user.id, { name: f.user.name, timer });
      }
      if (f.room === S.active) renderTyping();
    },
    pong() { clear("pong"); },
    refreshed(f) {
      if (f.expires_at !== undefined) S.expiresAt = f.expires_at;
      scheduleRefresh();
    },
    error(f) {
      notify(errorText(f), String(f.code ?? ""));
      if (!f.ref) return;
      const p = S.pending.get(f.ref);
      const retryMs = p ? overloadRetryMs(f, p.tries ?? 0) : null;
      if (p && retryMs !== null) { // a busy server: the chat stays pending ("sending…") and goes again, same ref
        p.tries = (p.tries ?? 0) + 1;
        const ref = f.ref;
        setTimeout(() => {
          const q = S.pending.get(ref);
          if (!q || q.sentOn !== S.connId || !room(q.room).joined) return; // a reconnect resends it at its join
          send({ type: "chat", room: q.room, message: q.message, ref });
        }, retryMs);
      } else if (p) failPending(f.ref);
      const joinRoomName = S.joinRefs.get(f.ref);
      if (joinRoomName && f.code === "forbidden_room") { S.wanted.delete(joinRoomName); saveRooms(); }
      S.joinRefs.delete(f.ref);
      if (joinRoomName && f.code === "since_ahead") { // the room's ids restarted: a new era, from now on
        const r = room(joinRoomName);
        [r.lastId, r.ids] = [null, new Set()];
        addGap(r, "The server lost this room's earlier messages.");
        joinRoom(joinRoomName);
      }
    },
  };
  function onFrame(text) {
    for (const f of framesOf(text)) if (Object.hasOwn(handlers, f.type)) handlers[f.type](f);
  }
  const saveRooms = () => put(session, K + "rooms", JSON.stringify([...S.wanted]));
  function joinRoom(name) {
    S.wanted.add(name);
    const ref = newRef();
    const r = room(name);
    // Back in a room: what followed the last message seen; new to it: its last few, for context.
    const resume = r.lastId != null ? { since: r.lastId } : { history: HISTORY_ON_JOIN };
    if (send({ type: "join", room: name, ref, ...resume })) S.joinRefs.set(ref, name);
  }

  // ---- typing out ----
  function stopTyping() {
    clear("typingIdle");
    if (S.typingRoom && S.rooms.get(S.typingRoom)?.joined) send({ type: "typing", room: S.typingRoom, typing: false });
    [S.typingRoom, S.typingAt] = [null, 0];
  }
  ui.input.addEventListener("input", () => {
    if (!canSend()) return;
    if (!ui.input.value) return stopTyping();
    const now = Date.now();
    if (S.typingRoom !== S.active || now - S.typingAt >= TYPING_EVERY_MS) {
      if (S.typingRoom && S.typingRoom !== S.active) stopTyping();
      send({ type: "typing", room: S.active, typing: true });
      [S.typingRoom, S.typingAt] = [S.active, now];
    }
    clear("typingIdle");
    S.t.typingIdle = setTimeout(stopTyping, TYPING_IDLE_MS);
  });

  // ---- user actions ----
  ui.composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const message = ui.input.value;
    if (!message.trim() || !canSend()) return;
    if (S.pending.size >= api.maxPending) {
      return notify(`${S.pending.size} messages are still waiting to be sent — wait a moment`, "outbox_full");
    }
    const ref = newRef();
    const frame = { type: "chat", room: S.active, message, ref };
    const problem = checkOutgoing(JSON.stringify(frame), message, S.limits);
    if (problem) { notify(problem, "too_long"); ui.input.focus(); return; }
    const ts = Date.now();
    const el = makeMessage({ room: S.active, from: S.user, message, ts, ref }, "pending");
    S.pending.set(ref, { room: S.active, message, ts, el, sentOn: S.connId });
    addMessage(room(S.active), el, true);
    send(frame); // chat before typing:false, so a nearly empty token bucket spends its token on the chat
    stopTyping();
    ui.input.value = "";
    ui.input.focus();
  });
  ui.rooms.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button[data-room]");
    if (!btn) return;
    const name = btn.dataset.room;
    setActive(name);
    if (!room(name).joined) joinRoom(name);
    if (!ui.input.disabled) ui.input.focus();
  });
  ui.leave.addEventListener("click", () => {
    if (S.active && room(S.active).joined) send({ type: "leave", room: S.active, ref: newRef() });
  });
  ui.reconnect.addEventListener("click", () => { S.attempt = 0; notify(""); connect(); });
  ui.signout.addEventListener("click", () => {
    const ws = S.ws;
    [S.token, S.sub, S.gen] = [null, null, S.gen + 1];
    put(session, K + "sub", null);
    clear(...Object.keys(S.t));
    onClose(1000);
    try { ws?.close(1000, "signed out"); } catch { /* already closing */ }
    S.pending.clear(); S.acked.clear(); S.rooms.clear();
    [S.allowed, S.user, S.wanted, roomsKey, ui.me.textContent] = [[], null, new Set(["lobby"]), null, ""];
    delete ui.me.dataset.userId;
    saveRooms();
    setActive(null);
    showChat(false);
    notify("Signed out.");
  });
  ui.signin.addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn();
  });
  async function signIn() {
    if (!TOKEN.session) {
      const name = ui.name.value.trim();
      if (!name) { ui.name.focus(); return; }
      S.name = name;
      put(local, K + "name", name);
    }
    ui.signinSubmit.disabled = true;
    try {
      await fetchToken();
      notify("");
      startSession();
    } catch (err) {
      notify(err.message === "no-dev" ? "Sign-in is not available here: open the link that carries your token."
        : err.message === "signed-out" ? SIGNED_OUT_TEXT : "Could not sign in. Please try again.", "signin", true);
    }
    ui.signinSubmit.disabled = false;
  }
  function showChat(on) {
    [ui.signinPanel.hidden, ui.chat.hidden, ui.signout.hidden, ui.linkPanel.hidden] = [on, !on, !on, true];
    if (!on) (TOKEN.session ? ui.signinSubmit : ui.name).focus();
  }
  function startSession() {
    showChat(true);
    [S.attempt, S.refocus] = [0, true]; // keyboard users land in the composer once it is usable
    connect();
  }

  // ---- a sign-in link (#token=...): anyone can send one, signing the reader in as whoever made it (a login
  // CSRF), so the page names that identity and asks; nothing connects before Continue ----
  let linkToken = null;
  function offerLink(token) {
    const claims = jwtClaims(token);
    const expired = claims?.exp != null && claims.exp * 1000 <= Date.now();
    if (!claims?.sub || expired) {
      showChat(false);
      return notify(expired ? "This sign-in link has expired: ask for a new one."
        : "This sign-in link is not valid: ask for a new one.", expired ? "link-expired" : "link-invalid", true);
    }
    const name = claims.name ?? defaultName(String(claims.sub)); // the server's rule (gateway/auth.py default_name)
    linkToken = token;
    [ui.linkName.textContent, ui.linkSub.textContent, ui.linkContinueName.textContent] = [name, claims.sub, name];
    [ui.signinPanel.hidden, ui.chat.hidden, ui.signout.hidden, ui.linkPanel.hidden] = [true, true, true, false];
    ui.linkHeading.focus(); // read first; Enter on the heading does nothing, so no one continues by accident
  }
  ui.linkContinue.addEventListener("click", () => {
    if (!linkToken) return;
    [S.token, S.expiresAt, linkToken] = [linkToken, jwtExpiryMs(linkToken), null];
    notify("");
    startSession();
  });
  ui.linkCancel.addEventListener("click", () => { linkToken = null; showChat(false); });

  // ---- start: a token in the fragment (#token=...), confirmed first, or the sign-in form ----
  const fragmentToken = new URLSearchParams(location.hash.slice(1)).get("token");
  ui.name.value = get(local, K + "name") ?? "";
  if (TOKEN.session) { // the operator's sign-in knows who this is: no name to ask
    ui.name.required = false;
    ui.name.hidden = ui.signin.querySelector('label[for="signin-name"]').hidden = true;
  }
  if (fragmentToken !== null) {
    history.replaceState(null, "", location.pathname + location.search); // keep it out of history and screenshots
    offerLink(fragmentToken);
  } else {
    showChat(false);
    if (TOKEN.session) signIn();
  }
}
