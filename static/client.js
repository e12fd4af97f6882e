// roomcast browser client for protocol v1 (docs/PROTOCOL.md): one WebSocket
// that reconnects with capped, fully jittered backoff, re-joins its rooms from
// a cursor (the last message id it knows of there), queues publishes while offline (each with an
// idempotency key, so a retry is stored once), detects dead sockets by silence
// and refreshes expiring tokens. Dependency-free ES module; see docs/CLIENT.md.

const DEFAULT_BACKOFF = Object.freeze({ initialMs: 500, maxMs: 30000, factor: 2 });
const DEFAULT_HEARTBEAT_MS = 25000;
// A connection open this long resets the reconnect backoff: one closed sooner
// (rate limited, slow consumer, a failing node) keeps backing off.
const STABLE_MS = 10000;
// Silence (nothing received) after which a socket counts as dead, in heartbeat
// intervals: the server pings every interval, and we ping after one quiet one.
const DEAD_AFTER_INTERVALS = 2.5;
// Close codes after which reconnecting would only repeat the failure.
const NO_RETRY = new Set([1002, 1007, 1008, 1009]);
const DRAINING = 1012;
const TOKEN_EXPIRED = 4001;
// How long a connect error may go without its close event.
const FAILED_CONNECT_GRACE_MS = 250;
// Requests that may be sent again after the socket died before their reply:
// a publish carries its idempotency key, presence only reads.
const RESENDABLE = new Set(["publish", "presence"]);
// The cursor of a room joined while its history was empty: every message the
// room holds at a later re-join was published after the join.
const START_ID = "0-0";

/** An error answered by the server (`code` is its error code) or raised by the client
 * (`queue_full`, `timeout`, `disconnected`, `closed`, `transport`, `credentials`, `bad_url`). */
export class RoomcastError extends Error {
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = "RoomcastError";
    this.code = code;
    Object.assign(this, extra);
  }
}

/** Reconnect delay for a (0-based) attempt: full jitter over an exponentially growing,
 * capped window, so a crowd of clients dropped at once does not come back at once. */
export function backoffDelay(attempt, backoff = {}, random = Math.random) {
  const { initialMs, maxMs, factor } = { ...DEFAULT_BACKOFF, ...backoff };
  return random() * Math.min(maxMs, initialMs * factor ** attempt);
}

function parseId(id) {
  const match = /^(\d+)-(\d+)$/.exec(typeof id === "string" ? id : "");
  // Digit strings, not Numbers: a sequence may exceed 2^53.
  return match && [match[1].replace(/^0+(?=\d)/, ""), match[2].replace(/^0+(?=\d)/, "")];
}

function compareDigits(a, b) {
  if (a.length !== b.length) return a.length < b.length ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Orders message ids `<ms>-<seq>` as pairs of numbers: -1, 0 or 1. */
export function compareIds(a, b) {
  const x = parseId(a);
  const y = parseId(b);
  if (!x || !y) return a < b ? -1 : a > b ? 1 : 0;
  return compareDigits(x[0], y[0]) || compareDigits(x[1], y[1]);
}

function randomKey() {
  const bytes = new Uint8Array(16);
  // getRandomValues, unlike randomUUID, also exists outside secure contexts (plain http).
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new RoomcastError("bad_url", "no URL given and no page location to derive one from");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

export class RoomcastClient {
  /**
   * @param {string} [url] the node's `/ws` URL; default: this page's host.
   * @param {object} [options] see docs/CLIENT.md.
   */
  constructor(url, options = {}) {
    this.url = url || null;
    this.options = options;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._setTimeout = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    this._clearTimeout = options.clearTimeout ?? ((id) => globalThis.clearTimeout(id));
    this._random = options.random ?? Math.random;
    this._now = options.now ?? (globalThis.performance?.now ? () => globalThis.performance.now() : () => Date.now());
    this._backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
    this._queueLimit = options.queueLimit ?? 1000;
    this._ackTimeoutMs = options.ackTimeoutMs ?? 10000;
    // A client-side token bucket below the server's default RATE_LIMIT/RATE_BURST
    // (50/s, 100): flushing a full offline queue at once would otherwise be
    // refused frame by frame and end in close 4029.
    this._sendRate = options.sendRate ?? 40;
    this._sendBurst = options.sendBurst ?? 80;
    this._tokens = this._sendBurst;
    this._tokensAt = this._now();

    this._listeners = new Map();
    // room -> { room, lastId (the cursor), everJoined, last, waiters, and per socket:
    // sentHere, joinedHere, silent (its replay only sets the cursor) }
    this._rooms = new Map();
    this._outbox = []; // requests not yet sent, in call order
    this._inflight = new Map(); // ref -> request sent and not yet answered
    this._ref = 0;
    this._seq = 0;
    this._openWaiters = [];
    this._leaving = new Map(); // room -> leaves sent and not yet answered

    this._state = "idle";
    this._attempt = 0;
    this._ws = null;
    this._gen = 0; // bumped per dial, so a stale async dial gives up
    this._welcomed = false;
    this._ready = false; // welcomed and every re-join answered: the outbox may flow
    this._gate = 0; // re-joins still unanswered on this socket
    this._stopped = false;
    this._everOpen = false;
    this._timers = { reconnect: null, heartbeat: null, pump: null, failed: null, stable: null };
    this.welcome = null;

    if (options.autoConnect !== false) {
      // Deferred so listeners attached right after construction see every event.
      queueMicrotask(() => {
        if (this._state === "idle") this._start();
      });
    }
  }

  /** `idle`, `connecting`, `open`, `reconnecting` or `closed`. */
  get state() {
    return this._state;
  }

  /** Rooms this client is in (and re-joins after a reconnect). */
  get rooms() {
    return [...this._rooms.keys()];
  }

  /** The room's cursor: the last message id seen there (or, when none was, the room's
   * newest id at the join, "0-0" for an empty room), or null before the first `joined`. */
  lastId(room) {
    return this._rooms.get(room)?.lastId ?? null;
  }

  /** Requests waiting to be sent (the offline queue). */
  get queued() {
    return this._outbox.length;
  }

  /** Connects (if not already) and resolves with the next `welcome`. */
  connect() {
    if (this._state === "open") return Promise.resolve(this.welcome);
    const opened = new Promise((resolve, reject) => this._openWaiters.push({ resolve, reject }));
    if (this._state === "idle" || this._state === "closed") this._start();
    return opened;
  }

  /** Closes for good: no reconnect; pending and queued requests are rejected (`closed`).
   * Rooms and their last ids are kept, so a later `connect()` resumes them. */
  close() {
    if (this._state === "closed") return;
    this._stopped = true;
    this._gen++;
    const ws = this._ws;
    this._teardown();
    if (ws) {
      try {
        ws.close(1000, "closed by client");
      } catch {
        // Already closing: nothing to do.
      }
    }
    this._fail(new RoomcastError("closed", "the client was closed"));
    this._setState("closed");
    this._emit("close", { code: 1000, reason: "closed by client", willReconnect: false, delayMs: null });
  }

  /** Joins a room; resolves with the `joined` frame. `last`: backlog of N messages;
   * `since`: resume from an id the app stored (e.g. across page loads). */
  join(room, { last, since } = {}) {
    if (this._state === "closed") return Promise.reject(new RoomcastError("closed", "the client is closed"));
    let entry = this._rooms.get(room);
    if (!entry) {
      entry = {
        room,
        lastId: since ?? null,
        everJoined: false,
        last: last ?? null,
        waiters: [],
        sentHere: false,
        joinedHere: false,
        silent: false,
        retry: null, // timer of a join sent again after a transient failure
        retries: 0,
      };
      this._rooms.set(room, entry);
    }
    const joined = new Promise((resolve, reject) => entry.waiters.push({ resolve, reject }));
    // Offline, the join is sent with the re-joins once the socket is welcomed.
    if (this._welcomed) this._sendJoin(entry, { last, gate: false });
    return joined;
  }

  /** Leaves a room and forgets it; resolves with the `left` frame. */
  leave(room) {
    const entry = this._rooms.get(room);
    this._forget(room);
    for (const waiter of entry?.waiters.splice(0) ?? []) {
      waiter.reject(new RoomcastError("left", `left room "${room}" before it was joined`));
    }
    if (!this._welcomed) return Promise.resolve({ type: "left", room });
    // Until the server answers, room frames still on their way come from the
    // membership being left: a join sent meanwhile must not take them as its own.
    this._leaving.set(room, (this._leaving.get(room) ?? 0) + 1);
    const answered = () => {
      const left = (this._leaving.get(room) ?? 0) - 1;
      if (left > 0) this._leaving.set(room, left);
      else this._leaving.delete(room);
    };
    return this._control("leave", { type: "leave", room }, { settled: answered });
  }

  /** Publishes to a room; resolves with the message id from the `ack`. */
  publish(room, data, { key } = {}) {
    return this._enqueue("publish", { type: "publish", room, data, key: key ?? randomKey() });
  }

  /** Sends to every connection of a user; resolves with the `ack` frame. */
  direct(user, data) {
    return this._enqueue("direct", { type: "direct", to: user, data });
  }

  /** Sends to every connection everywhere; resolves with the `ack` frame. */
  broadcast(data) {
    return this._enqueue("broadcast", { type: "broadcast", data });
  }

  /** Resolves with the sorted list of users in a room. */
  presence(room) {
    return this._enqueue("presence", { type: "presence", room });
  }

  /** Adds a listener; returns a function that removes it. */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  // ---- events and state -------------------------------------------------

  _emit(event, value) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) {
      try {
        fn(value);
      } catch (err) {
        // A faulty listener must not break frame handling for the others.
        if (typeof globalThis.reportError === "function") globalThis.reportError(err);
        else console.error(err);
      }
    }
  }

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("state", state);
  }

  _clearTimer(name) {
    if (this._timers[name] !== null) {
      this._clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }
  }

  // ---- connecting ---------------------------------------------------------

  _start() {
    this._stopped = false;
    this._attempt = 0;
    this._setState("connecting");
    this._dial();
  }

  _baseUrl() {
    const url = new URL(this.url ?? defaultUrl(), globalThis.location?.href);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    return url;
  }

  async _withCredentials(url) {
    const opts = this.options;
    if (opts.getTicket) url.searchParams.set("ticket", await opts.getTicket());
    else if (opts.getToken) url.searchParams.set("token", await opts.getToken());
    else if (opts.token) url.searchParams.set("token", opts.token);
    if (opts.user) url.searchParams.set("user", opts.user);
    return url.toString();
  }

  async _dial() {
    this._timers.reconnect = null;
    const gen = ++this._gen;
    let url;
    try {
      url = this._baseUrl();
    } catch (err) {
      // A malformed URL fails the same way every time: like a protocol error, no retry.
      this._emit("error", new RoomcastError("bad_url", `bad URL: ${err?.message ?? err}`, { cause: err }));
      this._socketGone(1002, "bad URL");
      return;
    }
    try {
      url = await this._withCredentials(url);
    } catch (err) {
      if (gen !== this._gen || this._stopped) return;
      this._emit("error", new RoomcastError("credentials", `no credential: ${err?.message ?? err}`, { cause: err }));
      this._socketGone(1006, "no credential");
      return;
    }
    if (gen !== this._gen || this._stopped) return;

    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (err) {
      this._emit("error", new RoomcastError("bad_url", `cannot open ${url}: ${err?.message ?? err}`, { cause: err }));
      this._socketGone(1002, "bad URL");
      return;
    }
    this._ws = ws;
    this._welcomed = false;
    this._lastRx = this._now();
    this._pinged = false;
    this._heartbeatMs = this.options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
    ws.onmessage = (event) => {
      if (this._ws === ws) this._onData(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws === ws) this._socketGone(event.code || 1006, event.reason || "");
    };
    ws.onerror = () => {
      if (this._ws !== ws) return;
      this._emit("error", new RoomcastError("transport", "WebSocket error"));
      // Browsers follow a failed connect with a close event, which does the
      // reconnecting; some runtimes (node 20's WebSocket) never do.
      if (ws.readyState !== 1 && this._timers.failed === null) {
        this._timers.failed = this._setTimeout(() => {
          this._timers.failed = null;
          if (this._ws === ws) this._socketGone(1006, "connection failed");
        }, FAILED_CONNECT_GRACE_MS);
      }
    };
    this._armHeartbeat();
  }

  // Detaches the current socket and stops every timer.
  _teardown() {
    const ws = this._ws;
    if (ws) ws.onmessage = ws.onclose = ws.onerror = null;
    this._ws = null;
    this._welcomed = false;
    this._ready = false;
    this._gate = 0;
    this._leaving.clear();
    // Joins in flight die with the socket: the next one starts the room afresh.
    for (const entry of this._rooms.values()) {
      entry.sentHere = entry.joinedHere = entry.silent = false;
      this._clearRetry(entry);
    }
    this._clearTimer("heartbeat");
    this._clearTimer("stable");
    this._clearTimer("pump");
    this._clearTimer("reconnect");
    this._clearTimer("failed");
  }

  _socketGone(code, reason) {
    this._teardown();
    this._requeueInflight();
    if (this._stopped) return;

    const { initialMs } = this._backoff;
    let retry = true;
    let delayMs;
    if (code === DRAINING) {
      // The node is going away or lost track of a room: another node behind the
      // load balancer can take us at once, so no escalation.
      delayMs = this._random() * initialMs;
    } else if (NO_RETRY.has(code)) {
      retry = false;
    } else if (code === TOKEN_EXPIRED && !this.options.getToken && !this.options.getTicket) {
      retry = false; // the same token would be refused again
    } else {
      delayMs = backoffDelay(this._attempt++, this._backoff, this._random);
    }

    if (!retry) {
      this._fail(new RoomcastError("closed", `connection closed (${code}${reason ? ": " + reason : ""})`, { closeCode: code }));
      this._setState("closed");
      this._emit("close", { code, reason, willReconnect: false, delayMs: null });
      return;
    }
    // Until a first welcome the client is still "connecting", however many tries it takes.
    this._timers.reconnect = this._setTimeout(() => this._dial(), delayMs);
    this._setState(this._everOpen ? "reconnecting" : "connecting");
    this._emit("close", { code, reason, willReconnect: true, delayMs });
  }

  // Requests whose socket died: publishes and presence go back to the queue (in
  // their original order, ahead of later ones); direct and broadcast may have
  // been delivered and have no key, so the app decides; joins are answered by
  // the re-join.
  _requeueInflight() {
    const again = [];
    for (const req of this._inflight.values()) {
      if (req.timer !== null) this._clearTimeout(req.timer);
      req.timer = null;
      if (RESENDABLE.has(req.kind)) again.push(req);
      else if (req.kind === "leave") req.resolve({ type: "left", room: req.frame.room });
      else if (req.kind === "direct" || req.kind === "broadcast") {
        req.reject(new RoomcastError("disconnected", `the connection closed before the ${req.kind} was acknowledged`));
      }
    }
    this._inflight.clear();
    if (again.length) this._outbox = [...again, ...this._outbox].sort((a, b) => a.seq - b.seq);
  }

  // Rejects everything waiting: the client will not connect again by itself.
  _fail(error) {
    for (const req of this._inflight.values()) {
      if (req.timer !== null) this._clearTimeout(req.timer);
      if (req.reject) req.reject(error);
    }
    this._inflight.clear();
    for (const req of this._outbox.splice(0)) req.reject(error);
    for (const entry of this._rooms.values()) {
      for (const waiter of entry.waiters.splice(0)) waiter.reject(error);
    }
    for (const waiter of this._openWaiters.splice(0)) waiter.reject(error);
  }

  // ---- heartbeat -------------------------------------------------------------

  // One timer, re-armed from the time of the last frame rather than reset on
  // every frame: a busy socket costs no timer churn.
  _armHeartbeat() {
    this._clearTimer("heartbeat");
    const interval = this._heartbeatMs;
    const deadAfter = interval * DEAD_AFTER_INTERVALS;
    const silent = this._now() - this._lastRx;
    if (silent >= deadAfter) {
      const ws = this._ws;
      this._teardown();
      try {
        ws.close(4000, "no traffic");
      } catch {
        // Closing a dead socket may throw in some environments; it is gone either way.
      }
      this._socketGone(1006, `nothing received for ${Math.round(silent)} ms`);
      return;
    }
    if (silent >= interval && !this._pinged && this._welcomed) {
      // Browsers answer the server's pings invisibly; a pong is traffic we can see.
      this._pinged = true;
      this._spendToken();
      this._sendRaw({ type: "ping" });
    }
    const due = (this._pinged || !this._welcomed ? deadAfter : interval) - silent;
    this._timers.heartbeat = this._setTimeout(() => {
      this._timers.heartbeat = null;
      this._armHeartbeat();
    }, Math.max(1, due));
  }

  // ---- sending ---------------------------------------------------------------

  _sendRaw(frame) {
    try {
      this._ws.send(JSON.stringify(frame));
    } catch (err) {
      // The close event follows and re-queues what was in flight.
      this._emit("error", new RoomcastError("transport", `send failed: ${err?.message ?? err}`, { cause: err }));
    }
  }

  _refill() {
    const now = this._now();
    this._tokens = Math.min(this._sendBurst, this._tokens + (Math.max(0, now - this._tokensAt) * this._sendRate) / 1000);
    this._tokensAt = now;
  }

  _paced() {
    return this._sendRate > 0 && Number.isFinite(this._sendRate);
  }

  // Control frames (joins, leaves, pings, refreshes) are never held back, but
  // they count, so the queue flushed after them waits its turn.
  _spendToken() {
    if (!this._paced()) return;
    this._refill();
    this._tokens -= 1;
  }

  // `extra.settled`, if given, runs as the request settles (synchronously, before
  // any frame that follows its reply).
  _newRequest(kind, frame, extra = {}) {
    const { settled, ...rest } = extra;
    const req = { kind, frame, seq: ++this._seq, ref: null, timer: null, ...rest };
    let open = true;
    const settle = () => {
      if (open && settled) settled();
      open = false;
    };
    req.promise = new Promise((resolve, reject) => {
      req.resolve = (value) => (settle(), resolve(value));
      req.reject = (err) => (settle(), reject(err));
    });
    // The app may ignore a request's outcome; errors also reach it as rejections it chose not to handle.
    req.promise.catch(() => {});
    return req;
  }

  _transmit(req) {
    req.ref = ++this._ref;
    this._inflight.set(req.ref, req);
    req.timer = this._setTimeout(() => this._timedOut(req), this._ackTimeoutMs);
    this._sendRaw({ ...req.frame, ref: req.ref });
  }

  _control(kind, frame, extra) {
    const req = this._newRequest(kind, frame, extra);
    this._spendToken();
    this._transmit(req);
    return req.promise;
  }

  _enqueue(kind, frame) {
    if (this._state === "closed") return Promise.reject(new RoomcastError("closed", "the client is closed"));
    if (this._outbox.length >= this._queueLimit) {
      const err = new RoomcastError("queue_full", `${this._outbox.length} requests are already queued`);
      if (frame.key !== undefined) err.key = frame.key;
      return Promise.reject(err);
    }
    const req = this._newRequest(kind, frame);
    this._outbox.push(req);
    this._pump();
    // A fresh promise so an app's missing .catch() is reported as usual.
    return req.promise.then((value) => value);
  }

  _pump() {
    this._clearTimer("pump");
    if (!this._ready) return;
    while (this._outbox.length) {
      if (this._paced()) {
        this._refill();
        if (this._tokens < 1) {
          const wait = Math.ceil(((1 - this._tokens) * 1000) / this._sendRate);
          this._timers.pump = this._setTimeout(() => {
            this._timers.pump = null;
            this._pump();
          }, wait);
          return;
        }
        this._tokens -= 1;
      }
      this._transmit(this._outbox.shift());
    }
  }

  _timedOut(req) {
    if (this._inflight.get(req.ref) !== req) return;
    this._inflight.delete(req.ref);
    req.timer = null;
    const err = new RoomcastError("timeout", `no reply to ${req.kind} within ${this._ackTimeoutMs} ms`);
    if (req.frame.key !== undefined) err.key = req.frame.key;
    if (req.kind === "join") this._joinFailed(req, err);
    else if (req.kind === "refresh") this._emit("error", err);
    else req.reject(err);
  }

  // ---- rooms -----------------------------------------------------------------

  _sendJoin(entry, { last, gate, resume = entry.everJoined && gate }) {
    const frame = { type: "join", room: entry.room };
    let backlog = last ?? (entry.everJoined ? null : entry.last);
    if (backlog === 0) backlog = null; // replays nothing even from a full history: no cursor
    // No cursor and no backlog asked for: ask for the newest message anyway, only
    // to take its id as the cursor, so that a re-join resumes with `since`.
    const probe = backlog == null && !entry.lastId;
    if (backlog != null) frame.last = backlog;
    else if (entry.lastId) frame.since = entry.resumeFrom ??= entry.lastId;
    else frame.last = 1;
    // Room frames before this socket's first `joined` of the room are the replay
    // of the first join sent for it on this socket (the server holds live ones).
    if (!entry.sentHere) {
      entry.sentHere = true;
      entry.silent = probe;
    }
    // `recovered` is news only for a room this client was already in.
    this._control("join", frame, { room: entry.room, gate, resume });
    if (gate) this._gate++;
  }

  _rejoin() {
    this._ready = false;
    this._gate = 0;
    for (const entry of this._rooms.values()) this._sendJoin(entry, { gate: true });
    if (this._gate === 0) this._becomeReady();
  }

  _becomeReady() {
    this._ready = true;
    this._pump();
  }

  _gateDone(req) {
    if (req.gate && this._welcomed && --this._gate === 0) this._becomeReady();
  }

  _onJoined(req, frame) {
    const entry = this._rooms.get(req.room);
    if (entry) {
      entry.everJoined = true;
      entry.joinedHere = true;
      entry.silent = false;
      entry.retries = 0;
      if (req.frame.since !== undefined && req.frame.since === entry.resumeFrom) entry.resumeFrom = null;
      // Nothing replayed (nor seen): the history was empty, so all it holds at the
      // next re-join is newer than this join.
      if (!entry.lastId) entry.lastId = START_ID;
      for (const waiter of entry.waiters.splice(0)) waiter.resolve(frame);
      if (req.resume) {
        this._emit("recovered", {
          room: req.room,
          recovered: frame.recovered !== false,
          replayed: frame.replayed ?? 0,
          since: req.frame.since ?? null,
        });
      }
    }
    req.resolve(frame);
    this._gateDone(req);
  }

  _joinFailed(req, err) {
    const entry = this._rooms.get(req.room);
    if (entry) {
      // A late replay after a timeout is not known to be the probe's any more.
      entry.silent = false;
      for (const waiter of entry.waiters.splice(0)) waiter.reject(err);
      // A room the server refused is not re-joined on every reconnect.
      if (err.code === "forbidden" || err.code === "bad_request") this._forget(req.room);
      // Anything else may pass (broker down, rate limited, no answer): this socket
      // asks again, backing off, so the room does not stay silent until a reconnect.
      else if (this._welcomed && !entry.joinedHere) this._retryJoin(entry, req.resume);
    }
    if (req.gate) this._emit("error", err);
    req.reject(err);
    this._gateDone(req);
  }

  _retryJoin(entry, resume) {
    this._clearRetry(entry);
    const delayMs = backoffDelay(entry.retries++, this._backoff, this._random);
    entry.retry = this._setTimeout(() => {
      entry.retry = null;
      if (this._welcomed && this._rooms.get(entry.room) === entry && !entry.joinedHere) {
        this._sendJoin(entry, { gate: false, resume });
      }
    }, delayMs);
  }

  _clearRetry(entry) {
    if (entry.retry !== null) {
      this._clearTimeout(entry.retry);
      entry.retry = null;
    }
  }

  // The app left the room, or the server refused or revoked it.
  _forget(room) {
    const entry = this._rooms.get(room);
    if (entry) this._clearRetry(entry);
    this._rooms.delete(room);
  }

  // ---- receiving ---------------------------------------------------------------

  _onData(data) {
    this._lastRx = this._now();
    this._pinged = false;
    if (typeof data !== "string") return; // the server sends text frames only
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this._emit("error", new RoomcastError("bad_frame", "the server sent a frame that is not JSON"));
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    switch (frame.type) {
      case "welcome":
        return this._onWelcome(frame);
      case "message":
        return this._onMessage(frame);
      case "joined":
      case "ack":
      case "pong":
      case "refreshed":
        return this._onReply(frame);
      case "left":
        if (frame.ref !== undefined) return this._onReply(frame);
        // Unasked: a refreshed token no longer allows the room.
        this._forget(frame.room);
        return this._emit("left", frame);
      case "presence":
        return this._onReply(frame);
      case "join":
      case "leave":
        return this._emit("presence", { type: frame.type, room: frame.room, user: frame.user });
      case "direct":
        return this._emit("direct", frame);
      case "broadcast":
        return this._emit("broadcast", frame);
      case "expiring":
        return this._onExpiring(frame);
      case "error":
        return this._onError(frame);
      default:
        return undefined; // newer server frames are ignored
    }
  }

  _onWelcome(frame) {
    this.welcome = frame;
    this._welcomed = true;
    this._everOpen = true;
    this._timers.stable = this._setTimeout(() => {
      this._timers.stable = null;
      this._attempt = 0;
    }, STABLE_MS);
    const hb = this.options.heartbeatMs ?? frame.heartbeat_ms;
    this._heartbeatMs = Number.isFinite(hb) && hb >= 10 ? hb : DEFAULT_HEARTBEAT_MS;
    this._armHeartbeat();
    this._rejoin();
    this._setState("open");
    this._emit("open", frame);
    for (const waiter of this._openWaiters.splice(0)) waiter.resolve(frame);
  }

  _onMessage(frame) {
    const entry = this._rooms.get(frame.room);
    if (!entry) return; // a room left a moment ago
    if (this._leaving.has(frame.room)) return; // sent before the server read our leave
    if (entry.silent && !entry.joinedHere) {
      // The newest message replayed to a join without cursor or backlog: it
      // predates the join and was not asked for, so it only becomes the cursor.
      if (typeof frame.id === "string" && (!entry.lastId || compareIds(frame.id, entry.lastId) > 0)) {
        entry.lastId = frame.id;
      }
      return;
    }
    if (typeof frame.id === "string") {
      // A replay may overlap what was already seen: ids only grow, so this drops repeats.
      if (entry.lastId && compareIds(frame.id, entry.lastId) <= 0) return;
      entry.lastId = frame.id;
    }
    this._emit("message", frame);
    this._emit(`message:${frame.room}`, frame);
  }

  _onReply(frame) {
    const req = frame.ref === undefined ? undefined : this._inflight.get(frame.ref);
    if (!req) return;
    this._inflight.delete(frame.ref);
    if (req.timer !== null) this._clearTimeout(req.timer);
    req.timer = null;
    switch (req.kind) {
      case "join":
        return this._onJoined(req, frame);
      case "publish":
        return req.resolve(frame.id);
      case "presence":
        return req.resolve(frame.users ?? []);
      case "refresh":
        this._emit("refreshed", frame);
        return req.resolve(frame);
      default:
        return req.resolve(frame);
    }
  }

  _onError(frame) {
    const err = new RoomcastError(frame.code ?? "error", frame.message ?? "", { frame });
    const req = frame.ref === undefined ? undefined : this._inflight.get(frame.ref);
    if (!req) {
      this._emit("error", err);
      return;
    }
    this._inflight.delete(frame.ref);
    if (req.timer !== null) this._clearTimeout(req.timer);
    req.timer = null;
    if (req.frame.key !== undefined) err.key = req.frame.key;
    if (req.kind === "join") this._joinFailed(req, err);
    else if (req.kind === "refresh") {
      this._emit("error", err);
      req.reject(err);
    } else req.reject(err);
  }

  async _onExpiring(frame) {
    this._emit("expiring", frame);
    if (!this.options.getToken) return;
    const ws = this._ws;
    let token;
    try {
      token = await this.options.getToken();
    } catch (err) {
      this._emit("error", new RoomcastError("credentials", `getToken failed: ${err?.message ?? err}`, { cause: err }));
      return;
    }
    // A socket replaced meanwhile was opened with a fresh token already.
    if (this._ws !== ws || !this._welcomed) return;
    this._control("refresh", { type: "refresh", token });
  }
}

globalThis.Roomcast = { RoomcastClient, RoomcastError, backoffDelay, compareIds };

export default RoomcastClient;
