// The Devastator client for browsers and Node: JSON-RPC 2.0 over one WebSocket
// (PROTOCOL.md sections 3 to 7), with reconnects, a send queue and deduplicated
// deliveries of messages and receipts. One state machine (idle -> connecting -> open -> closed) owns the
// socket; the WebSocket class is a constructor option so that tests can fake it.

const OPEN = 1; // WebSocket.OPEN, the same in browsers and in the ws package

export const ErrorCode = Object.freeze({
  PARSE_ERROR: -32700,
  INVALID_REQUEST: -32600,
  METHOD_NOT_FOUND: -32601,
  INVALID_PARAMS: -32602,
  INTERNAL_ERROR: -32603,
  NOT_AUTHENTICATED: -32001,
  FORBIDDEN: -32002,
  OVERLOADED: -32003,
  TOO_LARGE: -32004,
  UNKNOWN_RECIPIENT: -32005,
});

export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  INVALID_DATA: 1007,
  POLICY_VIOLATION: 1008,
  INTERNAL_ERROR: 1011,
  TRY_AGAIN_LATER: 1013,
  REPLACED: 4001,
  REVOKED: 4002,
  IDLE_TIMEOUT: 4003,
  SLOW_CONSUMER: 4004,
});

// Reconnecting cannot help after these: another connection took this device's
// place, its credentials are gone, or this client broke the protocol.
const FINAL_CLOSE_CODES = new Set([1002, 1003, 1007, 1008, 4001, 4002]);
// Auth answers that the same token will get again.
const BAD_CREDENTIALS = new Set([ErrorCode.NOT_AUTHENTICATED, ErrorCode.FORBIDDEN]);

/** A JSON-RPC error answer: `code` is one of ErrorCode, `data` is the error's data if any. */
export class RpcError extends Error {
  constructor(code, message, data) {
    super(message);
    this.name = "RpcError";
    this.code = code;
    this.data = data;
  }
}

/** The connection closed before a call was answered, or the client is closed. */
export class ConnectionError extends Error {
  constructor(code, reason) {
    super(`connection closed (${code}${reason ? `: ${reason}` : ""})`);
    this.name = "ConnectionError";
    this.code = code;
    this.reason = reason;
  }
}

export class DevastatorClient {
  #url;
  #getToken;
  #WebSocket;
  #backoff; // null: reconnecting is off
  #maxQueued;
  #dedupeSize;
  #listeners = { open: new Set(), message: new Set(), receipt: new Set(), signal: new Set(), close: new Set(), error: new Set() };

  #state = "idle";
  #conn = null; // the current attempt: { ws, notice, failure, retryAfterMs }
  #auth = null; // the last auth result
  #lastClose = { code: 1000, reason: "not connected" };
  #waiters = []; // connect() promises waiting for the next auth
  #attempt = 0; // failed attempts since the last auth, for the backoff
  #timer = null;
  #offline = false;

  #nextId = 1;
  #queue = []; // calls waiting for an authenticated connection, oldest first
  #inflight = new Map(); // JSON-RPC id -> call written on the current connection
  #seen = { message: new Set(), receipt: new Set() }; // ids the handlers took, oldest first
  #deliveries = Promise.resolve(); // handlers run one delivery (message or receipt) at a time, in order

  constructor(url, options = {}) {
    const { token, getToken, WebSocket = globalThis.WebSocket, reconnect = {}, maxQueued = 1000, dedupeSize = 10000 } = options;
    if (getToken === undefined && token === undefined) throw new TypeError("DevastatorClient needs options.token or options.getToken");
    if (typeof WebSocket !== "function") throw new TypeError("no WebSocket here: pass options.WebSocket (in Node, the ws package)");
    this.#url = url;
    this.#getToken = getToken ?? (() => token);
    this.#WebSocket = WebSocket;
    this.#backoff = reconnect === false ? null : { minDelayMs: reconnect.minDelayMs ?? 500, maxDelayMs: reconnect.maxDelayMs ?? 20000 };
    this.#maxQueued = maxQueued;
    this.#dedupeSize = dedupeSize;
  }

  /** "idle" (never connected), "connecting" (also while waiting to reconnect), "open" or "closed". */
  get state() {
    return this.#state;
  }

  /** The user of the last successful auth (null before one): a message `from` it is a copy of one sent from another device. */
  get user() {
    return this.#auth?.user ?? null;
  }

  /** The device of the last successful auth, or null. */
  get device() {
    return this.#auth?.device ?? null;
  }

  /** Listen to "open", "message", "receipt", "signal", "close" or "error"; returns a function that stops listening. */
  on(event, listener) {
    const listeners = this.#listeners[event];
    if (!listeners) throw new TypeError(`unknown event ${JSON.stringify(event)}`);
    listeners.add(listener);
    return () => {
      listeners.delete(listener);
    };
  }

  /** Connect (again, after "closed"); resolves with the auth result, rejects if the client closes first. */
  connect() {
    if (this.#state === "open") return Promise.resolve(this.#auth);
    const authenticated = new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
    if (this.#state !== "connecting") {
      this.#state = "connecting";
      this.#attempt = 0;
      this.#offline = false;
      this.#watchNetwork(true);
      this.#dial();
    }
    return authenticated;
  }

  /**
   * msg.send; resolves with { id, ts } once the server stored it. Waits in the queue while
   * disconnected and is sent again after a reconnect with the same cid, so it is stored once.
   * receipt: true asks for "delivered" and "read" receipts (the "receipt" event).
   */
  send(to, message, { cid, ttl, receipt } = {}) {
    const params = { to, message, cid: cid ?? newCid() };
    if (ttl !== undefined) params.ttl = ttl;
    if (receipt !== undefined) params.receipt = receipt;
    return this.#call("msg.send", params, true);
  }

  /**
   * msg.read: the user has read these messages (their senders get "read" receipts if they
   * asked). Resolves with "ACK" once stored; queued and sent again across reconnects like
   * send(), which is safe since the server stores a read once.
   */
  markRead(ids) {
    if (!Array.isArray(ids)) return Promise.reject(new TypeError("markRead(ids) wants an array of message ids"));
    return this.#call("msg.read", { ids }, true);
  }

  /**
   * msg.signal: ephemeral state (e.g. typing) for the recipients' devices online now.
   * Resolves with "ACK"; never queued: when not connected it rejects at once with ConnectionError.
   */
  signal(to, data) {
    if (this.#state !== "open") {
      return Promise.reject(new ConnectionError(this.#lastClose.code, this.#lastClose.reason || "not connected"));
    }
    return this.#call("msg.signal", { to, signal: data }, false);
  }

  /**
   * msg.history: a page of the conversation with a user, newest first: { messages, more }.
   * before: a message id (the page holds older ones); limit: 1 to 100 (the server's default 50).
   * A read: queued while disconnected and asked again after a reconnect.
   */
  history(withUser, { before, limit } = {}) {
    const params = { with: withUser };
    if (before !== undefined && before !== null) params.before = before;
    if (limit !== undefined) params.limit = limit;
    return this.#call("msg.history", params, true);
  }

  /** Any JSON-RPC request. Unlike send(), a call in flight when the connection drops rejects with ConnectionError. */
  call(method, params) {
    return this.#call(method, params, false);
  }

  ping() {
    return this.#call("ping", undefined, false);
  }

  /** Close for good (until connect() is called again): calls waiting for an answer reject. */
  close() {
    if (this.#state === "closed") return;
    const conn = this.#conn;
    this.#conn = null;
    if (conn) hangUp(conn.ws);
    this.#finish(new ConnectionError(1000, "client closed"), { code: 1000, reason: "client closed" });
  }

  // --- the connection's life -------------------------------------------------

  async #dial() {
    this.#timer = null;
    const conn = { ws: null, notice: null, failure: null, retryAfterMs: 0 };
    this.#conn = conn;
    let token;
    try {
      token = await this.#getToken();
    } catch (error) {
      if (this.#conn !== conn) return;
      this.#emit("error", error);
      if (!this.#backoff) conn.failure = error;
      this.#lost(conn, 1006, "getToken failed");
      return;
    }
    if (this.#conn !== conn) return; // closed, or gone offline, while the token came
    let ws;
    try {
      ws = new this.#WebSocket(this.#url);
    } catch (error) {
      conn.failure = error; // a URL the WebSocket refuses will not get better
      this.#lost(conn, 1006, String(error?.message ?? error));
      return;
    }
    conn.ws = ws;
    ws.onopen = () => this.#request(conn, this.#authCall(conn, token));
    ws.onmessage = (event) => this.#receive(conn, event.data);
    ws.onclose = (event) => this.#lost(conn, event.code, event.reason);
    ws.onerror = ignore; // a close event follows; the ws package throws on an error nobody listens to
  }

  #authCall(conn, token) {
    return {
      method: "auth.jwt",
      paramsText: JSON.stringify({ token }),
      retry: false,
      resolve: (result) => this.#opened(conn, result),
      reject: (error) => {
        if (this.#conn !== conn || !(error instanceof RpcError)) return; // the connection dropped first
        if (BAD_CREDENTIALS.has(error.code)) conn.failure = error;
        else conn.retryAfterMs = error.data?.retry_after_ms ?? 0; // e.g. -32003 overloaded: try again later
        this.#emit("error", error);
        this.#lost(conn, 1000, error.message);
      },
    };
  }

  #opened(conn, result) {
    if (this.#conn !== conn) return;
    this.#state = "open";
    this.#attempt = 0;
    this.#auth = result;
    this.#emit("open", result);
    for (const waiter of this.#waiters.splice(0)) waiter.resolve(result);
    while (this.#state === "open" && this.#conn === conn && this.#queue.length) this.#request(conn, this.#queue.shift());
  }

  /** The attempt or connection `conn` ended: reconnect, or close for good. */
  #lost(conn, code, reason = "") {
    if (this.#conn !== conn) return;
    this.#conn = null;
    hangUp(conn.ws);
    if (conn.notice) ({ code, reason } = conn.notice); // the server said why before it closed
    this.#lastClose = { code, reason };
    const failure = conn.failure ?? (this.#backoff && !FINAL_CLOSE_CODES.has(code) ? null : new ConnectionError(code, reason));
    // Sends in flight go out again with their cid; other calls cannot know whether they ran.
    const lost = new ConnectionError(code, reason);
    const resend = [];
    for (const call of this.#inflight.values()) (call.retry ? resend.push(call) : call.reject(lost));
    this.#inflight.clear();
    this.#queue.unshift(...resend);
    if (failure) {
      this.#finish(failure, { code, reason });
      return;
    }
    this.#state = "connecting";
    this.#emit("close", { code, reason, willReconnect: true });
    if (this.#state !== "connecting" || this.#conn || this.#timer) return; // a close listener acted already
    if (this.#offline) return; // the online event dials
    const { minDelayMs, maxDelayMs } = this.#backoff;
    const delay = Math.random() * Math.min(maxDelayMs, minDelayMs * 2 ** this.#attempt); // full jitter
    this.#attempt += 1;
    this.#timer = setTimeout(() => this.#dial(), Math.max(delay, conn.retryAfterMs));
  }

  #finish(error, { code, reason }) {
    this.#state = "closed";
    this.#lastClose = { code, reason };
    clearTimeout(this.#timer);
    this.#timer = null;
    this.#watchNetwork(false);
    const calls = [...this.#inflight.values(), ...this.#queue.splice(0)];
    this.#inflight.clear();
    for (const call of calls) call.reject(error);
    for (const waiter of this.#waiters.splice(0)) waiter.reject(error);
    this.#emit("close", { code, reason, willReconnect: false });
  }

  // Browsers only: going offline closes the socket at once (it would take a
  // TCP timeout to notice), coming online dials at once instead of after the backoff.
  #watchNetwork(on) {
    if (typeof globalThis.addEventListener !== "function") return;
    const method = on ? "addEventListener" : "removeEventListener";
    globalThis[method]("offline", this.#goneOffline);
    globalThis[method]("online", this.#backOnline);
  }

  #goneOffline = () => {
    this.#offline = true;
    clearTimeout(this.#timer);
    this.#timer = null;
    if (this.#conn) this.#lost(this.#conn, 1000, "offline");
  };

  #backOnline = () => {
    this.#offline = false;
    if (this.#state !== "connecting" || this.#conn) return;
    clearTimeout(this.#timer);
    this.#dial();
  };

  // --- JSON-RPC ---------------------------------------------------------------

  #call(method, params, retry) {
    return new Promise((resolve, reject) => {
      if (this.#state === "closed") throw new ConnectionError(this.#lastClose.code, this.#lastClose.reason);
      // Encoded now, so that a value JSON cannot carry fails at once, not after a reconnect.
      const call = { method, paramsText: params === undefined ? undefined : JSON.stringify(params), retry, resolve, reject };
      if (this.#state === "open") this.#request(this.#conn, call);
      else if (this.#queue.length >= this.#maxQueued) throw new Error(`the send queue is full (${this.#maxQueued} calls wait for a connection)`);
      else this.#queue.push(call);
    });
  }

  #request(conn, call) {
    const id = this.#nextId++;
    this.#inflight.set(id, call);
    const params = call.paramsText === undefined ? "" : `,"params":${call.paramsText}`;
    writeText(conn, `{"jsonrpc":"2.0","id":${id},"method":${JSON.stringify(call.method)}${params}}`);
  }

  #receive(conn, data) {
    if (this.#conn !== conn) return;
    let value;
    try {
      value = JSON.parse(data);
    } catch {
      this.#emit("error", new RpcError(ErrorCode.PARSE_ERROR, "the server sent a frame that is not JSON"));
      write(conn, failed(null, ErrorCode.PARSE_ERROR, "Parse error"));
      return;
    }
    const batch = Array.isArray(value);
    if (batch && value.length === 0) {
      write(conn, failed(null, ErrorCode.INVALID_REQUEST, "Invalid Request"));
      return;
    }
    const answers = (batch ? value : [value]).map((item) => this.#dispatch(conn, item)).filter((answer) => answer !== undefined);
    if (!answers.length) return; // responses and notifications only
    // A batch gets one batch of answers, once every handler is done.
    Promise.all(answers).then((list) => write(conn, batch ? list : list[0]));
  }

  /** One request, notification or response; returns its answer (maybe a promise), or undefined for none. */
  #dispatch(conn, item) {
    if (item === null || typeof item !== "object" || Array.isArray(item)) {
      return failed(null, ErrorCode.INVALID_REQUEST, "Invalid Request");
    }
    if (!("method" in item) && ("result" in item || "error" in item)) {
      this.#settle(item); // a response is never answered, so a malformed one cannot start a loop
      return undefined;
    }
    if (item.jsonrpc !== "2.0" || typeof item.method !== "string") {
      return failed(null, ErrorCode.INVALID_REQUEST, "Invalid Request");
    }
    if (!("id" in item)) {
      if (item.method === "conn.close" && Number.isInteger(item.params?.code)) {
        conn.notice = { code: item.params.code, reason: String(item.params.reason ?? "") };
      } else if (item.method === "msg.signal" && item.params !== null && typeof item.params === "object") {
        this.#emit("signal", item.params); // ephemeral: handed over at once, never answered
      }
      return undefined;
    }
    switch (item.method) {
      case "msg.recv":
        return this.#deliver("message", item.id, item.params);
      case "msg.receipt":
        return this.#deliver("receipt", item.id, item.params);
      case "msg.echo":
        return answered(item.id, "ACK");
      case "ping":
        return answered(item.id, "pong");
      default:
        return failed(item.id, ErrorCode.METHOD_NOT_FOUND, `Method not found: ${item.method}`);
    }
  }

  #settle(response) {
    const call = this.#inflight.get(response.id);
    const error = "error" in response ? rpcError(response.error) : null;
    if (!call) {
      // Unasked: the server's answer to a frame it could not read (its id is null).
      if (error) this.#emit("error", error);
      return;
    }
    this.#inflight.delete(response.id);
    if (error) call.reject(error);
    else call.resolve(response.result);
  }

  /**
   * A msg.recv ("message") or msg.receipt ("receipt"): the ACK goes out once
   * every listener of that event returned (or its promise resolved). A listener
   * that throws gets an "error" event and the server an error answer instead of
   * the ACK: the delivery stays pending on the server and comes again (after its
   * ACK timeout, or on the next connection).
   */
  #deliver(event, id, params) {
    const seen = this.#seen[event];
    const deliver = async () => {
      if (!seen.has(id)) {
        try {
          await Promise.all([...this.#listeners[event]].map((listener) => listener(params)));
        } catch (error) {
          this.#emit("error", error);
          return failed(id, ErrorCode.INTERNAL_ERROR, `the ${event} handler failed: ${error?.message ?? error}`);
        }
        seen.add(id);
        if (seen.size > this.#dedupeSize) seen.delete(seen.values().next().value);
      }
      return answered(id, "ACK"); // a duplicate is ACKed again: the earlier ACK may have been lost
    };
    this.#deliveries = this.#deliveries.then(deliver);
    return this.#deliveries;
  }

  #emit(event, value) {
    for (const listener of [...this.#listeners[event]]) {
      try {
        listener(value);
      } catch (error) {
        if (event !== "error") this.#emit("error", error);
      }
    }
  }
}

function ignore() {}

function hangUp(ws) {
  if (!ws) return;
  ws.onopen = ws.onmessage = ws.onclose = null;
  ws.onerror = ignore;
  ws.close(1000);
}

function write(conn, value) {
  writeText(conn, JSON.stringify(value));
}

function writeText(conn, text) {
  // Not open: the connection is going; what was in flight is dealt with when it has gone.
  if (conn.ws?.readyState === OPEN) conn.ws.send(text);
}

function answered(id, result) {
  return { jsonrpc: "2.0", id, result };
}

function failed(id, code, message) {
  return { jsonrpc: "2.0", id, error: { code, message } };
}

function rpcError(error) {
  return new RpcError(error?.code ?? ErrorCode.INTERNAL_ERROR, String(error?.message ?? "error without a message"), error?.data);
}

function newCid() {
  const crypto = globalThis.crypto;
  if (typeof crypto?.randomUUID === "function") return crypto.randomUUID(); // secure contexts only in browsers
  const bytes = new Uint8Array(16);
  if (typeof crypto?.getRandomValues === "function") crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}
