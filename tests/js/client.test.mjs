// Unit tests of static/client.js for node's built-in runner
// (`node --test tests/js/`): a scripted fake WebSocket and fake timers stand in
// for the network and the clock, so reconnects and silences run instantly.

import { test } from "node:test";
import assert from "node:assert/strict";

import RoomcastDefault, { RoomcastClient, backoffDelay, compareIds } from "../../static/client.js";

// Lets pending promise callbacks (async getToken, the deferred auto-connect) run.
const flush = () => new Promise((resolve) => setImmediate(resolve));

class FakeClock {
  constructor() {
    this.t = 1_700_000_000_000;
    this.timers = new Map();
    this.nextId = 1;
    this.now = () => this.t;
    this.setTimeout = (fn, ms = 0) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.t + Math.max(0, ms), fn, ms });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
  }

  // Runs due timers in time order, letting promises settle after each.
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      let nextId = null;
      let next = null;
      for (const [id, timer] of this.timers) {
        if (timer.at <= end && (!next || timer.at < next.at)) {
          next = timer;
          nextId = id;
        }
      }
      if (!next) break;
      this.timers.delete(nextId);
      this.t = next.at;
      next.fn();
      await flush();
    }
    this.t = end;
    await flush();
  }
}

function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      this.closedWith = null;
      sockets.push(this);
    }

    send(text) {
      this.sent.push(JSON.parse(text));
    }

    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }

    // ---- driven by the test ----
    receive(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }

    welcome(extra = {}) {
      this.readyState = 1;
      this.onopen?.({});
      this.receive({ type: "welcome", conn: `c-${sockets.indexOf(this) + 1}`, user: "alice", node: "node-1", heartbeat_ms: 25000, ...extra });
    }

    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }

    sentOfType(type) {
      return this.sent.filter((frame) => frame.type === type);
    }

    last() {
      return this.sent[this.sent.length - 1];
    }
  }
  return { FakeWebSocket, sockets };
}

// A client wired to fakes; `random` is fixed so delays are exact.
async function setup(options = {}) {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const client = new RoomcastClient("ws://node.test/ws", {
    user: "alice",
    WebSocket: FakeWebSocket,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0.5,
    ...options,
  });
  const events = [];
  for (const name of ["open", "close", "state", "recovered", "error", "message", "presence", "direct", "left"]) {
    client.on(name, (value) => events.push([name, value]));
  }
  await flush();
  return { client, clock, sockets, events, socket: () => sockets[sockets.length - 1] };
}

function closes(events) {
  return events.filter(([name]) => name === "close").map(([, value]) => value);
}

// Answers a join frame sent on `ws` with the given replayed messages and recovery flag.
function answerJoin(ws, join, { messages = [], recovered = true } = {}) {
  for (const message of messages) ws.receive({ type: "message", room: join.room, from: "bob", ...message });
  ws.receive({ type: "joined", room: join.room, recovered, replayed: messages.length, ref: join.ref });
}

// ---- pure functions -------------------------------------------------------------

test("backoffDelay: full jitter between 0 and the capped exponential window", () => {
  const opts = { initialMs: 500, maxMs: 30000, factor: 2 };
  assert.equal(backoffDelay(0, opts, () => 0), 0);
  assert.equal(backoffDelay(0, opts, () => 0.5), 250);
  assert.equal(backoffDelay(3, opts, () => 0.5), 2000);
  assert.ok(backoffDelay(3, opts, () => 0.999999) < 4000);
  for (let attempt = 0; attempt < 20; attempt++) {
    const delay = backoffDelay(attempt, opts, Math.random);
    assert.ok(delay >= 0 && delay < Math.min(30000, 500 * 2 ** attempt), `attempt ${attempt}: ${delay}`);
  }
  // Capped: far attempts stay within maxMs.
  assert.equal(backoffDelay(50, opts, () => 0.5), 15000);
  // Defaults apply to missing fields.
  assert.equal(backoffDelay(1, {}, () => 1), 1000);
});

test("compareIds compares <ms>-<seq> as pairs of numbers", () => {
  assert.equal(compareIds("9-0", "10-0"), -1);
  assert.equal(compareIds("1700000000000-9", "1700000000000-10"), -1);
  assert.equal(compareIds("1700000000001-0", "1700000000000-99"), 1);
  assert.equal(compareIds("5-5", "5-5"), 0);
  assert.equal(compareIds("5-05", "5-5"), 0);
  // Beyond 2^53 still exact.
  assert.equal(compareIds("1-18446744073709551615", "1-18446744073709551614"), 1);
});

test("exports: default export and a global for script users", () => {
  assert.equal(RoomcastDefault, RoomcastClient);
  assert.equal(globalThis.Roomcast.RoomcastClient, RoomcastClient);
  assert.equal(globalThis.Roomcast.backoffDelay, backoffDelay);
});

// ---- connecting and backoff ---------------------------------------------------

test("connects with ?user=, emits open and state, and resolves connect()", async () => {
  const { client, sockets, events } = await setup();
  assert.equal(sockets.length, 1);
  assert.equal(new URL(sockets[0].url).searchParams.get("user"), "alice");
  const opened = client.connect();
  sockets[0].welcome({ node: "node-7" });
  const welcome = await opened;
  assert.equal(welcome.node, "node-7");
  assert.equal(client.state, "open");
  assert.deepEqual(events.filter(([n]) => n === "state").map(([, s]) => s), ["connecting", "open"]);
  assert.equal(events.find(([n]) => n === "open")[1].conn, "c-1");
});

test("backoff grows exponentially with full jitter, is capped, and resets after a connection stays open 10 s", async () => {
  const { clock, sockets, events, client } = await setup({ backoff: { initialMs: 100, maxMs: 1000, factor: 2 } });
  const delays = [];
  for (let i = 0; i < 6; i++) {
    sockets[sockets.length - 1].serverClose(1006);
    const close = closes(events).at(-1);
    assert.equal(close.willReconnect, true);
    delays.push(close.delayMs);
    const before = sockets.length;
    await clock.advance(close.delayMs - 1);
    assert.equal(sockets.length, before, "no reconnect before the delay");
    await clock.advance(1);
    assert.equal(sockets.length, before + 1, "reconnect at the delay");
  }
  // random() = 0.5 of 100, 200, 400, 800, then the 1000 cap.
  assert.deepEqual(delays, [50, 100, 200, 400, 500, 500]);
  assert.equal(client.state, "connecting", "never opened yet");

  // Welcomed, then closed at once (rate limited, slow consumer, a failing
  // node): the backoff keeps growing.
  sockets.at(-1).welcome();
  assert.equal(client.state, "open");
  sockets.at(-1).serverClose(4029, "rate limited");
  assert.equal(closes(events).at(-1).delayMs, 500, "still backing off");
  await clock.advance(500);
  sockets.at(-1).welcome();
  await clock.advance(10000);
  sockets.at(-1).serverClose(1011, "internal");
  assert.equal(closes(events).at(-1).delayMs, 50, "attempt counter reset after 10 s open");
  assert.equal(client.state, "reconnecting");
});

test("1012 reconnects soon without escalating", async () => {
  const { clock, sockets, events } = await setup({ backoff: { initialMs: 400, maxMs: 30000, factor: 2 } });
  sockets[0].welcome();
  for (let i = 0; i < 5; i++) {
    sockets.at(-1).serverClose(1012, "draining");
    const close = closes(events).at(-1);
    assert.equal(close.willReconnect, true);
    assert.ok(close.delayMs < 400, `delay ${close.delayMs} within [0, initialMs)`);
    assert.equal(close.delayMs, 200);
    await clock.advance(close.delayMs);
  }
  assert.equal(sockets.length, 6);
  // A normal failure afterwards starts at attempt 0: the 1012s did not escalate.
  sockets.at(-1).serverClose(1006);
  assert.equal(closes(events).at(-1).delayMs, 200);
});

for (const code of [1008, 1002, 1007, 1009]) {
  test(`no retry after close ${code}`, async () => {
    const { clock, sockets, events, client } = await setup();
    sockets[0].welcome();
    const pending = client.publish("lobby", "x");
    sockets[0].serverClose(code, "policy");
    await assert.rejects(pending, { code: "closed" });
    const close = closes(events).at(-1);
    assert.deepEqual(close, { code, reason: "policy", willReconnect: false, delayMs: null });
    assert.equal(client.state, "closed");
    await clock.advance(120_000);
    assert.equal(sockets.length, 1);
  });
}

test("4001 without getToken: no retry", async () => {
  const { clock, sockets, events, client } = await setup({ token: "old.jwt", user: undefined });
  assert.equal(new URL(sockets[0].url).searchParams.get("token"), "old.jwt");
  sockets[0].welcome();
  sockets[0].serverClose(4001, "token expired");
  assert.equal(closes(events).at(-1).willReconnect, false);
  assert.equal(client.state, "closed");
  await clock.advance(120_000);
  assert.equal(sockets.length, 1);
});

test("4001 with getToken: reconnects with a fresh token", async () => {
  let n = 0;
  const { clock, sockets, events } = await setup({ user: undefined, getToken: async () => `jwt-${++n}` });
  assert.equal(new URL(sockets[0].url).searchParams.get("token"), "jwt-1");
  sockets[0].welcome();
  sockets[0].serverClose(4001, "token expired");
  const close = closes(events).at(-1);
  assert.equal(close.willReconnect, true);
  await clock.advance(close.delayMs);
  assert.equal(sockets.length, 2);
  assert.equal(new URL(sockets[1].url).searchParams.get("token"), "jwt-2");
});

test("getTicket: a fresh ticket per connection", async () => {
  let n = 0;
  const { clock, sockets, events } = await setup({ user: undefined, getTicket: async () => `t${++n}` });
  sockets[0].serverClose(1006);
  await clock.advance(closes(events).at(-1).delayMs);
  assert.deepEqual(sockets.map((s) => new URL(s.url).searchParams.get("ticket")), ["t1", "t2"]);
});

test("a connect error without a close event still leads to a reconnect", async () => {
  const { clock, sockets, events } = await setup();
  sockets[0].onerror?.({});
  assert.equal(events.filter(([n]) => n === "error").at(-1)[1].code, "transport");
  await clock.advance(250);
  const close = closes(events).at(-1);
  assert.equal(close.code, 1006);
  await clock.advance(close.delayMs);
  assert.equal(sockets.length, 2);
  // A browser's close event right after the error counts once.
  sockets[1].onerror?.({});
  sockets[1].serverClose(1006);
  await clock.advance(10_000);
  assert.equal(closes(events).length, 2);
});

test("a failing getToken is a failed attempt; a bad URL stops", async () => {
  let fail = true;
  const { clock, sockets, events } = await setup({ user: undefined, getToken: async () => {
    if (fail) throw new Error("auth server down");
    return "jwt";
  } });
  assert.equal(sockets.length, 0);
  assert.equal(events.filter(([n]) => n === "error").at(-1)[1].code, "credentials");
  const close = closes(events).at(-1);
  assert.equal(close.willReconnect, true);
  fail = false;
  await clock.advance(close.delayMs);
  assert.equal(sockets.length, 1);

  const broken = new RoomcastClient("ws://[bad", { autoConnect: false });
  const seen = [];
  broken.on("error", (err) => seen.push(err.code));
  await assert.rejects(broken.connect(), { code: "closed" });
  assert.deepEqual(seen, ["bad_url"]);
  assert.equal(broken.state, "closed");
});

test("close() stops everything", async () => {
  const { clock, sockets, events, client } = await setup();
  sockets[0].welcome();
  client.close();
  assert.equal(client.state, "closed");
  assert.equal(sockets[0].closedWith.code, 1000);
  assert.equal(closes(events).at(-1).willReconnect, false);
  await assert.rejects(client.publish("lobby", 1), { code: "closed" });
  await clock.advance(120_000);
  assert.equal(sockets.length, 1);
  assert.equal(clock.timers.size, 0, "no timer left behind");
});

// ---- rooms and resume ---------------------------------------------------------

test("join resolves with joined; after a reconnect rooms are re-joined with since = last id", async () => {
  const { client, clock, sockets, events } = await setup();
  const ws = sockets[0];
  ws.welcome();
  const joined = client.join("lobby", { last: 2 });
  const join = ws.last();
  assert.deepEqual({ ...join, ref: undefined }, { type: "join", room: "lobby", last: 2, ref: undefined });
  answerJoin(ws, join, { messages: [{ id: "1700000000000-9", data: "a" }, { id: "1700000000000-10", data: "b" }] });
  assert.equal((await joined).room, "lobby");
  client.join("quiet");
  answerJoin(ws, ws.last());
  assert.equal(client.lastId("lobby"), "1700000000000-10");
  assert.equal(client.lastId("quiet"), "0-0", "an empty room's cursor");

  ws.serverClose(1006);
  await clock.advance(closes(events).at(-1).delayMs);
  const ws2 = sockets[1];
  ws2.welcome();
  const joins = ws2.sentOfType("join");
  assert.equal(joins.length, 2);
  const lobby = joins.find((j) => j.room === "lobby");
  const quiet = joins.find((j) => j.room === "quiet");
  assert.equal(lobby.since, "1700000000000-10");
  assert.equal(lobby.last, undefined, "backlog only on the first join");
  assert.equal(quiet.since, "0-0", "joined while empty: everything in history now is new");
  assert.equal(quiet.last, undefined);

  // The replay overlaps: an equal and an older id are dropped, newer ones pass.
  answerJoin(ws2, lobby, {
    recovered: false,
    messages: [
      { id: "1700000000000-10", data: "b again" },
      { id: "1700000000000-2", data: "older" },
      { id: "1700000000001-0", data: "c" },
    ],
  });
  // A live copy of an already replayed message is a duplicate too.
  ws2.receive({ type: "message", room: "lobby", id: "1700000000001-0", from: "bob", data: "c again" });
  answerJoin(ws2, quiet);

  const data = events.filter(([n]) => n === "message").map(([, m]) => m.data);
  assert.deepEqual(data, ["a", "b", "c"]);
  const recovered = events.filter(([n]) => n === "recovered").map(([, r]) => r);
  assert.deepEqual(recovered.find((r) => r.room === "lobby"), { room: "lobby", recovered: false, replayed: 3, since: "1700000000000-10" });
  assert.equal(recovered.find((r) => r.room === "quiet").recovered, true);
  assert.equal(recovered.length, 2);
});

test("a room joined without last gets a cursor from its newest message, which is not emitted", async () => {
  const { client, clock, sockets, events } = await setup();
  const ws = sockets[0];
  ws.welcome();
  const joined = client.join("quiet");
  const join = ws.last();
  assert.deepEqual({ ...join, ref: undefined }, { type: "join", room: "quiet", last: 1, ref: undefined });
  answerJoin(ws, join, { messages: [{ id: "1700000000000-5", data: "old" }] });
  assert.equal((await joined).replayed, 1);
  assert.equal(client.lastId("quiet"), "1700000000000-5");
  // Live messages after the joined are the app's as usual.
  ws.receive({ type: "message", room: "quiet", id: "1700000000000-6", from: "bob", data: "live" });
  assert.deepEqual(events.filter(([n]) => n === "message").map(([, m]) => m.data), ["live"]);

  ws.serverClose(1006);
  await clock.advance(closes(events).at(-1).delayMs);
  const ws2 = sockets[1];
  ws2.welcome();
  const rejoin = ws2.sentOfType("join")[0];
  assert.equal(rejoin.since, "1700000000000-6");
  assert.equal(rejoin.last, undefined);
  answerJoin(ws2, rejoin, { messages: [{ id: "1700000000001-0", data: "missed" }] });
  assert.deepEqual(events.filter(([n]) => n === "message").map(([, m]) => m.data), ["live", "missed"]);
  assert.deepEqual(events.filter(([n]) => n === "recovered").map(([, r]) => r), [
    { room: "quiet", recovered: true, replayed: 1, since: "1700000000000-6" },
  ]);
});

test("a quiet room (no message seen) re-joins with since = the replayed newest id", async () => {
  const { client, clock, sockets, events } = await setup();
  sockets[0].welcome();
  client.join("quiet");
  answerJoin(sockets[0], sockets[0].last(), { messages: [{ id: "1700000000000-5", data: "old" }] });
  sockets[0].serverClose(1006);
  await clock.advance(closes(events).at(-1).delayMs);
  sockets[1].welcome();
  const rejoin = sockets[1].sentOfType("join")[0];
  assert.deepEqual({ ...rejoin, ref: undefined }, { type: "join", room: "quiet", since: "1700000000000-5", ref: undefined });
  // History overlapping the cursor (the old message again) is not emitted either.
  answerJoin(sockets[1], rejoin, { messages: [{ id: "1700000000000-5", data: "old" }, { id: "1700000000009-0", data: "new" }] });
  assert.deepEqual(events.filter(([n]) => n === "message").map(([, m]) => m.data), ["new"]);
});

test("an empty room re-joins with since 0-0; recovered:false is still surfaced", async () => {
  const { client, clock, sockets, events } = await setup();
  sockets[0].welcome();
  const joined = client.join("empty");
  const join = sockets[0].last();
  assert.equal(join.last, 1);
  answerJoin(sockets[0], join);
  assert.equal((await joined).replayed, 0);
  assert.equal(client.lastId("empty"), "0-0");

  sockets[0].serverClose(1006);
  await clock.advance(closes(events).at(-1).delayMs);
  sockets[1].welcome();
  const rejoin = sockets[1].sentOfType("join")[0];
  assert.deepEqual({ ...rejoin, ref: undefined }, { type: "join", room: "empty", since: "0-0", ref: undefined });
  // Published while offline: all of it is replayed and emitted. A server that
  // cannot prove its history complete from 0-0 says recovered:false.
  answerJoin(sockets[1], rejoin, {
    recovered: false,
    messages: [{ id: "1700000000100-0", data: "first" }, { id: "1700000000100-1", data: "second" }],
  });
  assert.deepEqual(events.filter(([n]) => n === "message").map(([, m]) => m.data), ["first", "second"]);
  assert.equal(client.lastId("empty"), "1700000000100-1");
  assert.deepEqual(events.filter(([n]) => n === "recovered").map(([, r]) => r), [
    { room: "empty", recovered: false, replayed: 2, since: "0-0" },
  ]);
});

test("last: N still emits the N messages and sets the cursor; none replayed gives 0-0", async () => {
  const { client, clock, sockets, events } = await setup();
  sockets[0].welcome();
  client.join("chat", { last: 3 });
  const chat = sockets[0].last();
  assert.equal(chat.last, 3);
  answerJoin(sockets[0], chat, {
    messages: [{ id: "10-0", data: "a" }, { id: "11-0", data: "b" }, { id: "12-0", data: "c" }],
  });
  assert.deepEqual(events.filter(([n]) => n === "message").map(([, m]) => m.data), ["a", "b", "c"]);
  assert.equal(client.lastId("chat"), "12-0");
  client.join("new", { last: 3 });
  answerJoin(sockets[0], sockets[0].last());
  assert.equal(client.lastId("new"), "0-0");

  sockets[0].serverClose(1006);
  await clock.advance(closes(events).at(-1).delayMs);
  sockets[1].welcome();
  const joins = Object.fromEntries(sockets[1].sentOfType("join").map((j) => [j.room, j]));
  assert.equal(joins.chat.since, "12-0");
  assert.equal(joins.new.since, "0-0");
  assert.equal(joins.chat.last, undefined);
  assert.equal(joins.new.last, undefined);
});

test("last: 0 is a join without backlog: the cursor comes from the newest message", async () => {
  const { client, sockets, events } = await setup();
  sockets[0].welcome();
  client.join("r", { last: 0 });
  const join = sockets[0].last();
  assert.equal(join.last, 1);
  answerJoin(sockets[0], join, { messages: [{ id: "7-0", data: "old" }] });
  assert.equal(client.lastId("r"), "7-0");
  assert.equal(events.filter(([n]) => n === "message").length, 0);
});

test("a socket lost before the first joined: the replayed newest id still serves as cursor", async () => {
  const { client, clock, sockets, events } = await setup();
  sockets[0].welcome();
  const joined = client.join("r");
  sockets[0].receive({ type: "message", room: "r", id: "7-0", from: "bob", data: "old" });
  sockets[0].serverClose(1006);
  assert.equal(client.lastId("r"), "7-0");
  await clock.advance(closes(events).at(-1).delayMs);
  sockets[1].welcome();
  const rejoin = sockets[1].sentOfType("join")[0];
  assert.equal(rejoin.since, "7-0");
  answerJoin(sockets[1], rejoin, { messages: [{ id: "8-0", data: "new" }] });
  assert.equal((await joined).room, "r");
  assert.deepEqual(events.filter(([n]) => n === "message").map(([, m]) => m.data), ["new"]);
  assert.equal(events.filter(([n]) => n === "recovered").length, 0, "not yet joined before: no recovered");
});

test("a join made offline without last probes at the welcome; a since given by the app is used as is", async () => {
  const { client, sockets, events } = await setup();
  client.join("probe");
  client.join("kept", { since: "3-0" });
  sockets[0].welcome();
  const joins = Object.fromEntries(sockets[0].sentOfType("join").map((j) => [j.room, j]));
  assert.equal(joins.probe.last, 1);
  assert.equal(joins.kept.since, "3-0");
  answerJoin(sockets[0], joins.probe, { messages: [{ id: "9-0", data: "probe old" }] });
  answerJoin(sockets[0], joins.kept, { messages: [{ id: "4-0", data: "kept missed" }] });
  assert.deepEqual(events.filter(([n]) => n === "message").map(([, m]) => m.data), ["kept missed"]);
  assert.equal(client.lastId("probe"), "9-0");
  assert.equal(client.lastId("kept"), "4-0");
});

test("room-specific message events; left rooms are not re-joined", async () => {
  const { client, clock, sockets, events } = await setup();
  const ws = sockets[0];
  ws.welcome();
  const seen = [];
  client.on("message:a", (m) => seen.push(m.id));
  client.join("a");
  answerJoin(ws, ws.last());
  client.join("b");
  answerJoin(ws, ws.last());
  ws.receive({ type: "message", room: "a", id: "1-0", from: "bob", data: 1 });
  ws.receive({ type: "message", room: "b", id: "1-1", from: "bob", data: 2 });
  assert.deepEqual(seen, ["1-0"]);

  const left = client.leave("b");
  const leave = ws.last();
  assert.deepEqual({ type: leave.type, room: leave.room }, { type: "leave", room: "b" });
  ws.receive({ type: "left", room: "b", ref: leave.ref });
  assert.equal((await left).type, "left");
  assert.deepEqual(client.rooms, ["a"]);

  ws.serverClose(1001);
  await clock.advance(closes(events).at(-1).delayMs);
  sockets[1].welcome();
  assert.deepEqual(sockets[1].sentOfType("join").map((j) => j.room), ["a"]);
});

test("a join made while offline is sent after the welcome and resolves", async () => {
  const { client, sockets } = await setup();
  const joined = client.join("lobby", { last: 5 });
  assert.equal(sockets[0].sent.length, 0);
  sockets[0].welcome();
  const join = sockets[0].last();
  assert.equal(join.last, 5);
  answerJoin(sockets[0], join);
  assert.equal((await joined).room, "lobby");
});

test("a refused join rejects with the server's code and is forgotten", async () => {
  const { client, sockets } = await setup();
  sockets[0].welcome();
  const joined = client.join("admin");
  sockets[0].receive({ type: "error", code: "forbidden", message: "not allowed in room \"admin\"", ref: sockets[0].last().ref });
  await assert.rejects(joined, { code: "forbidden", message: "not allowed in room \"admin\"" });
  assert.deepEqual(client.rooms, []);
});

test("presence events, presence() and direct()", async () => {
  const { client, sockets, events } = await setup();
  const ws = sockets[0];
  ws.welcome();
  ws.receive({ type: "join", room: "lobby", user: "carol" });
  ws.receive({ type: "leave", room: "lobby", user: "carol" });
  assert.deepEqual(events.filter(([n]) => n === "presence").map(([, p]) => p), [
    { type: "join", room: "lobby", user: "carol" },
    { type: "leave", room: "lobby", user: "carol" },
  ]);

  const users = client.presence("lobby");
  ws.receive({ type: "presence", room: "lobby", users: ["alice", "bob"], ref: ws.last().ref });
  assert.deepEqual(await users, ["alice", "bob"]);

  const sent = client.direct("bob", { q: "lunch?" });
  assert.deepEqual({ ...ws.last(), ref: 0 }, { type: "direct", to: "bob", data: { q: "lunch?" }, ref: 0 });
  ws.receive({ type: "ack", ref: ws.last().ref });
  assert.equal((await sent).type, "ack");

  const gone = client.direct("nobody", 1);
  ws.receive({ type: "error", code: "not_found", message: "no such user", ref: ws.last().ref });
  await assert.rejects(gone, { code: "not_found" });

  ws.receive({ type: "direct", from: "bob", data: "psst" });
  assert.deepEqual(events.filter(([n]) => n === "direct").map(([, d]) => d.data), ["psst"]);
  // An error tied to no request goes to the error event.
  ws.receive({ type: "error", code: "bad_request", message: "frame is not a JSON object" });
  assert.equal(events.filter(([n]) => n === "error").at(-1)[1].code, "bad_request");
});

// ---- publishing -----------------------------------------------------------------

test("publishes queued offline are sent in order after the re-joins, resolved by ack or rejected by error", async () => {
  const { client, clock, sockets, events } = await setup();
  let ws = sockets[0];
  ws.welcome();
  client.join("lobby");
  answerJoin(ws, ws.last());
  ws.receive({ type: "message", room: "lobby", id: "5-0", from: "bob", data: 1 });
  ws.serverClose(1006);

  const first = client.publish("lobby", { text: "one" });
  const second = client.publish("lobby", { text: "two" }, { key: "my-key" });
  assert.equal(client.queued, 2);
  await clock.advance(closes(events).at(-1).delayMs);
  ws = sockets[1];
  ws.welcome();
  assert.deepEqual(ws.sent.map((f) => f.type), ["join"], "publishes wait for the re-join");
  answerJoin(ws, ws.sent[0]);
  const publishes = ws.sentOfType("publish");
  assert.deepEqual(publishes.map((p) => p.data.text), ["one", "two"]);
  assert.equal(publishes[1].key, "my-key");
  assert.equal(typeof publishes[0].key, "string");
  assert.ok(publishes[0].key.length >= 16);
  assert.notEqual(publishes[0].ref, publishes[1].ref);

  ws.receive({ type: "ack", id: "6-0", ref: publishes[0].ref });
  ws.receive({ type: "error", code: "unavailable", message: "broker down", ref: publishes[1].ref });
  assert.equal(await first, "6-0");
  await assert.rejects(second, (err) => err.code === "unavailable" && err.message === "broker down" && err.key === "my-key");
});

test("publish keys are unique", async () => {
  const { client, sockets } = await setup();
  sockets[0].welcome();
  for (let i = 0; i < 50; i++) client.publish("r", i);
  const keys = new Set(sockets[0].sentOfType("publish").map((p) => p.key));
  assert.equal(keys.size, 50);
});

test("the offline queue is bounded: beyond queueLimit, queue_full", async () => {
  const { client } = await setup({ queueLimit: 2 });
  const a = client.publish("r", 1);
  const b = client.publish("r", 2);
  await assert.rejects(client.publish("r", 3), (err) => err.code === "queue_full" && err instanceof Error);
  assert.equal(client.queued, 2);
  client.close();
  await assert.rejects(a, { code: "closed" });
  await assert.rejects(b, { code: "closed" });
});

test("a publish in flight when the socket dies is re-sent with the same key", async () => {
  const { client, clock, sockets, events } = await setup();
  sockets[0].welcome();
  const acked = client.publish("lobby", "hello");
  const later = client.publish("lobby", "after");
  const [sent, sentLater] = sockets[0].sentOfType("publish");
  sockets[0].serverClose(1012, "draining");
  const queuedMeanwhile = client.publish("lobby", "queued");
  await clock.advance(closes(events).at(-1).delayMs);
  sockets[1].welcome();
  const resent = sockets[1].sentOfType("publish");
  assert.deepEqual(resent.map((p) => p.data), ["hello", "after", "queued"]);
  assert.equal(resent[0].key, sent.key);
  assert.equal(resent[1].key, sentLater.key);
  sockets[1].receive({ type: "ack", id: "9-0", ref: resent[0].ref });
  sockets[1].receive({ type: "ack", id: "9-1", ref: resent[1].ref });
  sockets[1].receive({ type: "ack", id: "9-2", ref: resent[2].ref });
  assert.equal(await acked, "9-0");
  assert.equal(await later, "9-1");
  assert.equal(await queuedMeanwhile, "9-2");
});

test("a request unanswered for ackTimeoutMs is rejected with timeout", async () => {
  const { client, clock, sockets } = await setup({ ackTimeoutMs: 1000 });
  sockets[0].welcome();
  const rejected = assert.rejects(client.publish("lobby", "x", { key: "k1" }), (err) => err.code === "timeout" && err.key === "k1");
  await clock.advance(999);
  assert.equal(sockets[0].sentOfType("publish").length, 1);
  await clock.advance(1);
  await rejected;
});

test("a full queue is flushed at a pace the server's rate limit accepts", async () => {
  const { client, clock, sockets, events } = await setup({ sendRate: 10, sendBurst: 5 });
  sockets[0].serverClose(1006);
  const all = [];
  for (let i = 0; i < 12; i++) all.push(client.publish("r", i));
  await clock.advance(closes(events).at(-1).delayMs);
  sockets[1].welcome();
  assert.equal(sockets[1].sentOfType("publish").length, 5, "a burst first");
  await clock.advance(300);
  assert.equal(sockets[1].sentOfType("publish").length, 8, "then sendRate per second");
  await clock.advance(400);
  assert.deepEqual(sockets[1].sentOfType("publish").map((p) => p.data), [...Array(12).keys()]);
  for (const frame of sockets[1].sentOfType("publish")) sockets[1].receive({ type: "ack", id: `1-${frame.data}`, ref: frame.ref });
  assert.equal((await Promise.all(all)).length, 12);
});

// ---- liveness and tokens --------------------------------------------------------

test("silence: a ping after one interval, a new socket after 2.5 intervals", async () => {
  const { clock, sockets, events, client } = await setup();
  sockets[0].welcome({ heartbeat_ms: 1000 });
  await clock.advance(999);
  assert.equal(sockets[0].sentOfType("ping").length, 0);
  await clock.advance(1);
  assert.equal(sockets[0].sentOfType("ping").length, 1, "pinged after a quiet interval");

  // Traffic keeps it alive.
  sockets[0].receive({ type: "pong" });
  await clock.advance(2000);
  assert.equal(sockets[0].closedWith, null);
  assert.equal(sockets[0].sentOfType("ping").length, 2);

  // Now nothing comes back at all.
  await clock.advance(500);
  assert.notEqual(sockets[0].closedWith, null, "the silent socket was dropped");
  assert.equal(client.state, "reconnecting");
  const close = closes(events).at(-1);
  assert.equal(close.code, 1006);
  assert.equal(close.willReconnect, true);
  await clock.advance(close.delayMs);
  assert.equal(sockets.length, 2);
});

test("heartbeatMs option overrides welcome.heartbeat_ms", async () => {
  const { clock, sockets } = await setup({ heartbeatMs: 200 });
  sockets[0].welcome({ heartbeat_ms: 25000 });
  await clock.advance(200);
  assert.equal(sockets[0].sentOfType("ping").length, 1);
  await clock.advance(300);
  assert.notEqual(sockets[0].closedWith, null);
});

test("a socket that never says welcome is replaced too", async () => {
  const { clock, sockets } = await setup({ heartbeatMs: 1000 });
  await clock.advance(2500);
  assert.notEqual(sockets[0].closedWith, null);
});

test("expiring: getToken is called and a refresh is sent", async () => {
  const tokens = ["jwt-1", "jwt-2"];
  const { client, sockets, events } = await setup({ user: undefined, getToken: async () => tokens.shift() });
  sockets[0].welcome();
  sockets[0].receive({ type: "expiring", exp: 1700000600 });
  await flush();
  const refresh = sockets[0].last();
  assert.equal(refresh.type, "refresh");
  assert.equal(refresh.token, "jwt-2");
  assert.ok(refresh.ref !== undefined);
  const refreshed = [];
  client.on("refreshed", (frame) => refreshed.push(frame.exp));
  sockets[0].receive({ type: "refreshed", exp: 1700004200, ref: refresh.ref });
  assert.deepEqual(refreshed, [1700004200]);
  assert.equal(events.filter(([n]) => n === "error").length, 0);
});

test("an unasked left (token no longer allows the room) forgets the room", async () => {
  const { client, sockets, events } = await setup();
  sockets[0].welcome();
  client.join("admin");
  answerJoin(sockets[0], sockets[0].last());
  sockets[0].receive({ type: "left", room: "admin", reason: "not permitted by the refreshed token" });
  assert.deepEqual(client.rooms, []);
  assert.equal(events.filter(([n]) => n === "left").length, 1);
});

test("a re-join answered with a transient error keeps the room and resumes it on the next socket", async () => {
  const { client, clock, sockets, events } = await setup();
  sockets[0].welcome();
  client.join("lobby");
  answerJoin(sockets[0], sockets[0].last(), { messages: [{ id: "5-0", data: "old" }] });
  // The node lost its broker: it resyncs its clients with 1012.
  sockets[0].serverClose(1012, "messages may be missing: reconnect and resume");
  await clock.advance(closes(events).at(-1).delayMs);
  sockets[1].welcome();
  const rejoin = sockets[1].sentOfType("join")[0];
  assert.equal(rejoin.since, "5-0");
  // The broker is still down: history cannot be read, nothing was joined.
  sockets[1].receive({ type: "error", code: "unavailable", message: "broker down", ref: rejoin.ref });
  assert.deepEqual(client.rooms, ["lobby"], "a transient failure must not forget the room");
  // The broker is back; the next connection must re-join lobby from its cursor.
  sockets[1].serverClose(1012);
  await clock.advance(closes(events).at(-1).delayMs);
  sockets[2].welcome();
  assert.deepEqual(sockets[2].sentOfType("join").map((j) => [j.room, j.since]), [["lobby", "5-0"]]);
});

test("a resume cut off before its joined still reports recovered:false from the original cursor", async () => {
  // The server's history of the room starts at 500-0 (older messages trimmed).
  const history = ["500-0", "501-0", "502-0"];
  const serverAnswer = (ws, join) => {
    const recovered = compareIds(join.since, "499-0") >= 0; // history reaches back to `since`
    const messages = history.filter((id) => compareIds(id, join.since) > 0).map((id) => ({ id, data: id }));
    answerJoin(ws, join, { messages, recovered });
  };
  const { client, clock, sockets, events } = await setup();
  sockets[0].welcome();
  client.join("lobby");
  answerJoin(sockets[0], sockets[0].last(), { messages: [{ id: "100-0", data: "old" }] });
  assert.equal(client.lastId("lobby"), "100-0");
  sockets[0].serverClose(1006);
  await clock.advance(closes(events).at(-1).delayMs);

  // Offline for long: the re-join from 100-0 replays what is left (500-0...),
  // but the socket dies before the `joined` (which would say recovered:false).
  sockets[1].welcome();
  const rejoin = sockets[1].sentOfType("join")[0];
  assert.equal(rejoin.since, "100-0");
  sockets[1].receive({ type: "message", room: "lobby", id: "500-0", from: "bob", data: "500-0" });
  sockets[1].receive({ type: "message", room: "lobby", id: "501-0", from: "bob", data: "501-0" });
  sockets[1].serverClose(1006);
  await clock.advance(closes(events).at(-1).delayMs);

  sockets[2].welcome();
  serverAnswer(sockets[2], sockets[2].sentOfType("join")[0]);
  assert.deepEqual(events.filter(([n]) => n === "message").map(([, m]) => m.data), ["500-0", "501-0", "502-0"]);
  const recovered = events.filter(([n]) => n === "recovered").map(([, r]) => r);
  assert.ok(recovered.some((r) => r.recovered === false), `the gap after 100-0 was never reported: ${JSON.stringify(recovered)}`);
});

test("close() from a close listener leaves no reconnect timer behind", async () => {
  const { client, clock, sockets } = await setup();
  sockets[0].welcome();
  // e.g. "give up after N failures"
  client.on("close", (e) => {
    if (e.willReconnect) client.close();
  });
  sockets[0].serverClose(1006);
  assert.equal(client.state, "closed");
  assert.equal(clock.timers.size, 0, "no timer left behind");
});

test("close() from a close listener then connect() opens one socket, not two", async () => {
  const { client, clock, sockets } = await setup();
  sockets[0].welcome();
  let gaveUp = false;
  client.on("close", (e) => {
    if (e.willReconnect && !gaveUp) {
      gaveUp = true;
      client.close();
    }
  });
  sockets[0].serverClose(1006);
  client.connect(); // the user clicks "retry"
  await flush();
  assert.equal(sockets.length, 2);
  sockets[1].welcome();
  await clock.advance(1000); // the leaked reconnect timer fires
  assert.equal(sockets.length, 2, `a second socket was dialled; the first one is ${sockets[1].closedWith ? "closed" : "still open, orphaned"}`);
});

test("after a leave, room frames still in flight do not swallow a new join's backlog", async () => {
  const { client, sockets, events } = await setup();
  const ws = sockets[0];
  ws.welcome();
  client.join("r");
  answerJoin(ws, ws.last(), { messages: [{ id: "10-0", data: "a" }] });
  ws.receive({ type: "message", room: "r", id: "11-0", from: "bob", data: "b" });
  client.leave("r");
  const leave = ws.last();
  const seen = events.filter(([n]) => n === "message").length;
  const joined = client.join("r", { last: 3 });
  const join = ws.last();
  // Written by the server before it read the leave:
  ws.receive({ type: "message", room: "r", id: "12-0", from: "bob", data: "c" });
  ws.receive({ type: "left", room: "r", ref: leave.ref });
  answerJoin(ws, join, { messages: [{ id: "10-0", data: "a" }, { id: "11-0", data: "b" }, { id: "12-0", data: "c" }] });
  await joined;
  assert.deepEqual(events.filter(([n]) => n === "message").slice(seen).map(([, m]) => m.data), ["a", "b", "c"], "the backlog of the new join");
});

test("4029, which comes after a welcome, backs off further on each repeat", async () => {
  const { clock, sockets, events } = await setup();
  const delays = [];
  for (let i = 0; i < 5; i++) {
    sockets.at(-1).welcome();
    sockets.at(-1).serverClose(4029, "rate limited");
    delays.push(closes(events).at(-1).delayMs);
    await clock.advance(delays.at(-1));
  }
  assert.ok(delays.at(-1) > delays[0], `delays never grow: ${delays}`);
});

test("a late left for a timed-out leave does not forget the room joined again", async () => {
  const { client, clock, sockets, events } = await setup({ ackTimeoutMs: 1000 });
  const ws = sockets[0];
  ws.welcome();
  client.join("r");
  answerJoin(ws, ws.last());
  const left = client.leave("r");
  const leave = ws.last();
  await clock.advance(1000);
  await assert.rejects(left, { code: "timeout" });
  client.join("r");
  answerJoin(ws, ws.last());
  ws.receive({ type: "left", room: "r", ref: leave.ref }); // the slow answer to the old leave
  assert.deepEqual(client.rooms, ["r"]);
  assert.equal(events.filter(([n]) => n === "left").length, 0);
});

test("a welcome with a malformed heartbeat_ms does not spin the heartbeat timer", async () => {
  const { clock, sockets } = await setup();
  sockets[0].welcome({ heartbeat_ms: "25s" });
  const armed = [...clock.timers.values()].map((t) => t.ms);
  assert.ok(armed.every((ms) => ms >= 1000), `heartbeat re-armed after ${armed} ms`);
});

test("a backward jump of the wall clock does not stall publishes for the jump's length", async () => {
  const { client, clock, sockets } = await setup();
  sockets[0].welcome();
  clock.t -= 3_600_000; // NTP correction, or the user sets the clock back an hour
  client.publish("r", 1);
  await clock.advance(5000);
  assert.equal(sockets[0].sentOfType("publish").length, 1, `pump timer: ${[...clock.timers.values()].map((t) => t.ms)}`);
});

test("a re-join that fails for a passing reason is sent again on the same socket, backing off", async () => {
  const { sockets, events, clock, client } = await setup();
  sockets[0].welcome();
  client.join("lobby");
  answerJoin(sockets[0], sockets[0].last(), { messages: [{ id: "5-0", data: "old" }] });
  sockets[0].serverClose(1006);
  await clock.advance(closes(events).at(-1).delayMs);
  const ws = sockets[1];
  ws.welcome();
  const first = ws.sentOfType("join")[0];
  ws.receive({ type: "error", code: "unavailable", message: "broker down", ref: first.ref });
  assert.equal(ws.sentOfType("join").length, 1, "not at once");
  await clock.advance(250); // random() = 0.5 of initialMs 500
  const second = ws.sentOfType("join")[1];
  assert.equal(second?.since, "5-0", "sent again from the cursor");
  ws.receive({ type: "error", code: "unavailable", message: "still down", ref: second.ref });
  await clock.advance(499);
  assert.equal(ws.sentOfType("join").length, 2, "the next try waits longer");
  await clock.advance(1);
  const third = ws.sentOfType("join")[2];
  answerJoin(ws, third, { messages: [{ id: "6-0", data: "new" }] });
  assert.deepEqual(
    events.filter(([n]) => n === "recovered").map(([, r]) => [r.room, r.recovered, r.since]),
    [["lobby", true, "5-0"]],
  );
  // ("old" was the first join's probe: the cursor, not a message for the app.)
  assert.deepEqual(events.filter(([n]) => n === "message").map(([, m]) => m.data), ["new"]);
  client.close();
  assert.equal(clock.timers.size, 0, "no timer left");
});
