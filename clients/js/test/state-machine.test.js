// The client's state machine against a fake WebSocket: no server, no network.
// The test plays the server through the fake socket.
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { CloseCode, ConnectionError, DevastatorClient, ErrorCode, RpcError } from "../index.js";
import { ack, fakeWebSocket, once, recv } from "./fake-websocket.js";

const URL = "ws://server.test/ws";
const OPTIONS = { timeout: 5000 };
const FAST = { minDelayMs: 1, maxDelayMs: 1 };

/** A client and its fake; closed after the test. */
function setup(t, options = {}) {
  const fake = fakeWebSocket();
  const client = new DevastatorClient(URL, { token: "jwt-1", WebSocket: fake.WebSocket, reconnect: FAST, ...options });
  t.after(() => client.close());
  return { fake, client };
}

/** A client authenticated on its first socket. */
async function connected(t, options) {
  const { fake, client } = setup(t, options);
  const connecting = client.connect();
  const ws = await fake.next();
  await ws.authenticate();
  await connecting;
  return { fake, client, ws };
}

/** setTimeout as the client sees it: each delay recorded, and fired at once so that tests do not wait. */
function recordDelays(t) {
  const delays = [];
  const realSetTimeout = globalThis.setTimeout;
  t.mock.method(globalThis, "setTimeout", (callback, ms) => {
    delays.push(ms);
    return realSetTimeout(callback, 0);
  });
  return delays;
}

describe("connecting and auth", () => {
  test("auth.jwt is a JSON-RPC 2.0 request; connect() resolves with its result and emits open", OPTIONS, async (t) => {
    const { fake, client } = setup(t);
    assert.equal(client.state, "idle");
    const opened = once(client, "open");
    const connecting = client.connect();
    assert.equal(client.state, "connecting");
    const ws = await fake.next();
    assert.equal(ws.url, URL);
    ws.accept();
    const request = await ws.frame();
    assert.deepEqual(request, { jsonrpc: "2.0", id: request.id, method: "auth.jwt", params: { token: "jwt-1" } });
    const result = { user: "alice", device: "phone", pending: 3 };
    ws.deliver({ jsonrpc: "2.0", id: request.id, result });
    assert.deepEqual(await connecting, result);
    assert.deepEqual(await opened, result);
    assert.equal(client.state, "open");
    assert.deepEqual(await client.connect(), result, "connect() when open gives the same result");
    assert.equal(fake.all.length, 1);
  });

  test("getToken is called before every connection attempt", OPTIONS, async (t) => {
    let calls = 0;
    const { fake, client } = setup(t, { token: undefined, getToken: async () => `jwt-${++calls}` });
    client.connect().catch(() => {}); // rejected by close() after the test
    const first = await fake.next();
    first.drop(1006);
    const second = await fake.next();
    const request = await second.authenticate();
    assert.equal(request.params.token, "jwt-2");
    second.drop(1001);
    const third = await fake.next();
    assert.equal((await third.authenticate()).params.token, "jwt-3");
    assert.equal(calls, 3);
  });

  test("a getToken that throws is an error event and a retry", OPTIONS, async (t) => {
    let calls = 0;
    const getToken = async () => {
      calls += 1;
      if (calls === 1) throw new Error("token service down");
      return "jwt-ok";
    };
    const { fake, client } = setup(t, { token: undefined, getToken });
    const errored = once(client, "error");
    const connecting = client.connect();
    assert.equal((await errored).message, "token service down");
    const ws = await fake.next();
    assert.equal((await ws.authenticate()).params.token, "jwt-ok");
    await connecting;
    assert.equal(fake.all.length, 1, "no socket without a token");
  });

  for (const code of [ErrorCode.FORBIDDEN, ErrorCode.NOT_AUTHENTICATED]) {
    test(`auth answered ${code}: connect() rejects with RpcError, closed, no reconnect`, OPTIONS, async (t) => {
      const delays = recordDelays(t);
      const { fake, client } = setup(t);
      const errors = [];
      client.on("error", (error) => errors.push(error));
      const closed = once(client, "close");
      const queued = client.send("bob", "never sent");
      const connecting = client.connect();
      const ws = await fake.next();
      ws.accept();
      const request = await ws.frame();
      ws.deliver({ jsonrpc: "2.0", id: request.id, error: { code, message: "bad credentials" } });
      await assert.rejects(connecting, (error) => error instanceof RpcError && error.code === code && error.message === "bad credentials");
      await assert.rejects(queued, (error) => error instanceof RpcError && error.code === code);
      assert.deepEqual(await closed, { code: 1000, reason: "bad credentials", willReconnect: false });
      assert.equal(client.state, "closed");
      assert.deepEqual(ws.closedByClient, { code: 1000, reason: "" });
      assert.equal(errors.length, 1);
      assert.deepEqual(delays, [], "no reconnect scheduled");
      assert.equal(fake.all.length, 1);
    });
  }

  test("auth answered -32003 (overloaded): reconnect, not sooner than retry_after_ms", OPTIONS, async (t) => {
    const delays = recordDelays(t);
    const { fake, client } = setup(t);
    const connecting = client.connect();
    const ws = await fake.next();
    ws.accept();
    const request = await ws.frame();
    ws.deliver({ jsonrpc: "2.0", id: request.id, error: { code: -32003, message: "busy", data: { retry_after_ms: 750 } } });
    const again = await fake.next();
    assert.deepEqual(delays, [750]);
    await again.authenticate();
    await connecting;
    assert.equal(client.state, "open");
  });

  test("reconnect: false closes at the first drop, and connect() rejects with ConnectionError", OPTIONS, async (t) => {
    const { fake, client } = setup(t, { reconnect: false });
    const connecting = client.connect();
    (await fake.next()).drop(1006, "refused");
    await assert.rejects(connecting, (error) => error instanceof ConnectionError && error.code === 1006 && error.reason === "refused");
    assert.equal(client.state, "closed");
  });

  test("connect() after closed connects again", OPTIONS, async (t) => {
    const { fake, client } = await connected(t);
    client.close();
    assert.equal(client.state, "closed");
    const connecting = client.connect();
    await (await fake.next()).authenticate({ user: "alice", device: "phone", pending: 0 });
    await connecting;
    assert.equal(client.state, "open");
  });
});

describe("backoff", () => {
  test("full jitter: random(0, min(max, min * 2^attempt)), reset after a successful auth", OPTIONS, async (t) => {
    const delays = recordDelays(t);
    t.mock.method(Math, "random", () => 0.5);
    const { fake, client } = setup(t, { reconnect: { minDelayMs: 100, maxDelayMs: 1000 } });
    client.connect().catch(() => {}); // rejected by close() after the test
    for (let i = 0; i < 7; i++) (await fake.next()).drop(1006);
    assert.deepEqual(delays, [50, 100, 200, 400, 500, 500, 500]);
    const ws = await fake.next();
    await ws.authenticate();
    ws.drop(1006);
    await fake.next();
    assert.equal(delays.at(-1), 50, "the attempt count starts again after an auth");
  });

  test("delays stay within their bounds and vary", OPTIONS, async (t) => {
    const delays = recordDelays(t);
    const { fake, client } = setup(t, { reconnect: { minDelayMs: 500, maxDelayMs: 20000 } });
    client.connect().catch(() => {}); // rejected by close() after the test
    for (let i = 0; i < 40; i++) (await fake.next()).drop(1006);
    delays.forEach((delay, attempt) => {
      assert.ok(delay >= 0 && delay <= Math.min(20000, 500 * 2 ** attempt), `attempt ${attempt}: ${delay}`);
    });
    assert.ok(new Set(delays.slice(10)).size > 20, "capped delays are still random");
    assert.ok(delays.slice(10).some((delay) => delay > 2000), "the bound grows");
  });

  test("the defaults are 500 ms to 20 s", OPTIONS, async (t) => {
    const delays = recordDelays(t);
    t.mock.method(Math, "random", () => 0.999999);
    const { fake, client } = setup(t, { reconnect: {} });
    client.connect().catch(() => {}); // rejected by close() after the test
    for (let i = 0; i < 8; i++) (await fake.next()).drop(1006);
    assert.deepEqual(delays.map(Math.round), [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000]);
  });
});

describe("close codes", () => {
  for (const code of [1002, 1003, 1007, 1008, 4001, 4002]) {
    test(`no reconnect after close code ${code}`, OPTIONS, async (t) => {
      const delays = recordDelays(t);
      const { fake, client, ws } = await connected(t);
      const inFlight = client.send("bob", "hello");
      const closed = once(client, "close");
      ws.drop(code, "why");
      assert.deepEqual(await closed, { code, reason: "why", willReconnect: false });
      assert.equal(client.state, "closed");
      await assert.rejects(inFlight, (error) => error instanceof ConnectionError && error.code === code);
      await assert.rejects(client.send("bob", "after"), ConnectionError);
      assert.deepEqual(delays, []);
      assert.equal(fake.all.length, 1);
    });
  }

  for (const code of [1000, 1001, 1006, 1011, 1013, 4003, 4004]) {
    test(`reconnect after close code ${code}`, OPTIONS, async (t) => {
      const { fake, client, ws } = await connected(t);
      const closed = once(client, "close");
      ws.drop(code);
      assert.deepEqual(await closed, { code, reason: "", willReconnect: true });
      assert.equal(client.state, "connecting");
      await (await fake.next()).authenticate();
      assert.equal(client.state, "open");
    });
  }

  test("a conn.close notification decides over the WebSocket close code", OPTIONS, async (t) => {
    const { fake, client, ws } = await connected(t);
    const closed = once(client, "close");
    ws.deliver({ jsonrpc: "2.0", method: "conn.close", params: { code: 4001, reason: "replaced" } });
    assert.equal(ws.unread, 0, "a notification gets no answer");
    ws.drop(1006);
    assert.deepEqual(await closed, { code: 4001, reason: "replaced", willReconnect: false });
    assert.equal(fake.all.length, 1);
  });

  test("conn.close with a code to reconnect after wins over a final WebSocket code", OPTIONS, async (t) => {
    const { fake, client, ws } = await connected(t);
    const closed = once(client, "close");
    ws.deliver({ jsonrpc: "2.0", method: "conn.close", params: { code: CloseCode.IDLE_TIMEOUT, reason: "idle" } });
    ws.drop(1008);
    assert.deepEqual(await closed, { code: 4003, reason: "idle", willReconnect: true });
    await (await fake.next()).authenticate();
  });
});

describe("the send queue", () => {
  test("sends made before connecting wait, bounded, and go out after auth with their cid", OPTIONS, async (t) => {
    const { fake, client } = setup(t, { maxQueued: 2 });
    const first = client.send("bob", { text: "one" }, { cid: "cid-1", ttl: 60 });
    const second = client.send(["bob", "carol"], null);
    await assert.rejects(client.send("bob", "three"), /queue is full/);
    const connecting = client.connect();
    const ws = await fake.next();
    await ws.authenticate();
    await connecting;
    const a = await ws.frame();
    const b = await ws.frame();
    assert.deepEqual(a, { jsonrpc: "2.0", id: a.id, method: "msg.send", params: { to: "bob", message: { text: "one" }, cid: "cid-1", ttl: 60 } });
    assert.equal(b.method, "msg.send");
    assert.deepEqual(b.params.to, ["bob", "carol"]);
    assert.equal(b.params.message, null);
    assert.match(b.params.cid, /^[0-9a-f-]{32,36}$/, "a cid is made");
    assert.notEqual(a.id, b.id);
    ws.deliver([
      { jsonrpc: "2.0", id: b.id, result: { id: "m2", ts: 2 } },
      { jsonrpc: "2.0", id: a.id, result: { id: "m1", ts: 1 } },
    ]);
    assert.deepEqual(await first, { id: "m1", ts: 1 });
    assert.deepEqual(await second, { id: "m2", ts: 2 });
    assert.equal(ws.unread, 0, "responses are not answered");
  });

  test("a send in flight when the connection drops is sent again with the same cid", OPTIONS, async (t) => {
    const { fake, client, ws } = await connected(t);
    const sending = client.send("bob", "hello");
    const pinging = client.ping();
    const sent = await ws.frame();
    assert.equal((await ws.frame()).method, "ping");
    const queuedWhileDown = [];
    const off = client.on("close", () => {
      off();
      queuedWhileDown.push(client.send("bob", "while down", { cid: "later" }));
    });
    ws.drop(1006);
    await assert.rejects(pinging, (error) => error instanceof ConnectionError && error.code === 1006);
    const again = await fake.next();
    await again.authenticate();
    const resent = await again.frame();
    const later = await again.frame();
    assert.equal(resent.params.cid, sent.params.cid);
    assert.deepEqual(resent.params, sent.params);
    assert.notEqual(resent.id, sent.id, "a new request id on the new connection");
    assert.equal(later.params.cid, "later", "the resent call goes before those queued after it");
    again.deliver({ jsonrpc: "2.0", id: resent.id, result: { id: "m1", ts: 5 } });
    again.deliver({ jsonrpc: "2.0", id: later.id, result: { id: "m2", ts: 6 } });
    assert.deepEqual(await sending, { id: "m1", ts: 5 });
    assert.deepEqual(await queuedWhileDown[0], { id: "m2", ts: 6 });
  });

  test("a value JSON cannot carry is refused at once", OPTIONS, async (t) => {
    const { client } = setup(t);
    await assert.rejects(client.send("bob", { big: 1n }), TypeError);
  });

  test("close() rejects what waits and in flight, and stops", OPTIONS, async (t) => {
    const delays = recordDelays(t);
    const { fake, client, ws } = await connected(t);
    const inFlight = client.send("bob", "one");
    await ws.frame();
    const closed = once(client, "close");
    client.close();
    assert.equal(client.state, "closed");
    assert.deepEqual(await closed, { code: 1000, reason: "client closed", willReconnect: false });
    await assert.rejects(inFlight, (error) => error instanceof ConnectionError && error.code === 1000);
    await assert.rejects(client.send("bob", "two"), ConnectionError);
    assert.equal(ws.closedByClient.code, 1000);
    client.close(); // twice is fine
    assert.deepEqual(delays, []);
    assert.equal(fake.all.length, 1);
  });

  test("close() while waiting to reconnect cancels the reconnect and rejects connect()", OPTIONS, async (t) => {
    const { fake, client } = setup(t, { reconnect: { minDelayMs: 60000, maxDelayMs: 60000 } });
    t.mock.method(Math, "random", () => 1);
    const connecting = client.connect();
    const queued = client.send("bob", "x");
    (await fake.next()).drop(1006);
    assert.equal(client.state, "connecting");
    client.close();
    await assert.rejects(connecting, ConnectionError);
    await assert.rejects(queued, ConnectionError);
    assert.equal(fake.all.length, 1);
  });
});

describe("deliveries", () => {
  test("a batch of msg.recv gets one batch of ACKs, after the handlers, called in order", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const seen = [];
    let release;
    const released = new Promise((resolve) => (release = resolve));
    let firstCalled;
    const called = new Promise((resolve) => (firstCalled = resolve));
    client.on("message", async (msg) => {
      seen.push(msg.id);
      firstCalled();
      await released;
    });
    ws.deliver([recv("m1"), recv("m2"), recv("m3")]);
    await called;
    assert.deepEqual(seen, ["m1"], "one message at a time");
    assert.equal(ws.unread, 0, "no ACK before the handler's promise resolves");
    release();
    assert.deepEqual(await ws.frame(), [ack("m1"), ack("m2"), ack("m3")]);
    assert.deepEqual(seen, ["m1", "m2", "m3"]);
  });

  test("a single msg.recv gets a single ACK; the handler gets the params", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const received = once(client, "message");
    ws.deliver(recv("m1", { text: "hi" }));
    assert.deepEqual(await received, { id: "m1", from: "bob", to: "alice", message: { text: "hi" }, ts: 1, expires: 2 });
    assert.deepEqual(await ws.frame(), ack("m1"));
  });

  test("a duplicate is ACKed again but not handed over; the set of ids is bounded", OPTIONS, async (t) => {
    const { client, ws } = await connected(t, { dedupeSize: 3 });
    const seen = [];
    client.on("message", (msg) => seen.push(msg.id));
    ws.deliver([recv("a"), recv("b"), recv("c"), recv("a")]);
    assert.deepEqual(await ws.frame(), [ack("a"), ack("b"), ack("c"), ack("a")]);
    ws.deliver(recv("c"));
    assert.deepEqual(await ws.frame(), ack("c"));
    assert.deepEqual(seen, ["a", "b", "c"]);
    ws.deliver(recv("d")); // a is the oldest of the 3 kept: forgotten
    await ws.frame();
    ws.deliver(recv("a"));
    await ws.frame();
    ws.deliver(recv("c"));
    await ws.frame();
    assert.deepEqual(seen, ["a", "b", "c", "d", "a"]);
  });

  test("duplicates across connections: the id delivered again after a reconnect is not handed over", OPTIONS, async (t) => {
    const { fake, client, ws } = await connected(t);
    const seen = [];
    client.on("message", (msg) => seen.push(msg.id));
    ws.deliver(recv("m1"));
    await ws.frame();
    ws.drop(1006);
    const again = await fake.next();
    await again.authenticate({ user: "alice", device: "phone", pending: 1 });
    again.deliver([recv("m1"), recv("m2")]);
    assert.deepEqual(await again.frame(), [ack("m1"), ack("m2")]);
    assert.deepEqual(seen, ["m1", "m2"]);
  });

  test("a handler that throws: error event, an error answer instead of the ACK, and the redelivery is handed over", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    let calls = 0;
    client.on("message", async () => {
      calls += 1;
      if (calls === 1) throw new Error("disk full");
    });
    const errored = once(client, "error");
    ws.deliver([recv("m1"), recv("m2")]);
    assert.equal((await errored).message, "disk full");
    const [failed, acked] = await ws.frame();
    assert.equal(failed.id, "m1");
    assert.equal(failed.error.code, ErrorCode.INTERNAL_ERROR);
    assert.deepEqual(acked, ack("m2"));
    ws.deliver(recv("m1"));
    assert.deepEqual(await ws.frame(), ack("m1"));
    assert.equal(calls, 3);
  });

  test("the other server requests: msg.echo, ping, unknown methods; notifications get nothing", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const signals = [];
    client.on("message", (msg) => signals.push(msg));
    ws.deliver([
      { jsonrpc: "2.0", id: "echo-1", method: "msg.echo", params: { message: 1 } },
      { jsonrpc: "2.0", method: "msg.signal", params: { signal: "typing" } },
      { jsonrpc: "2.0", id: 7, method: "ping" },
      { jsonrpc: "2.0", id: 8, method: "no.such" },
      { jsonrpc: "2.0", id: 99, result: "an answer to nothing" },
    ]);
    const answers = await ws.frame();
    assert.deepEqual(answers.slice(0, 2), [ack("echo-1"), { jsonrpc: "2.0", id: 7, result: "pong" }]);
    assert.equal(answers[2].id, 8);
    assert.equal(answers[2].error.code, ErrorCode.METHOD_NOT_FOUND);
    assert.equal(answers.length, 3);
    ws.deliver({ jsonrpc: "2.0", method: "msg.signal", params: {} });
    ws.deliver({ jsonrpc: "2.0", id: 9, method: "ping" });
    assert.deepEqual(await ws.frame(), { jsonrpc: "2.0", id: 9, result: "pong" }, "nothing was sent for the notification");
    assert.deepEqual(signals, []);
  });

  test("invalid JSON and invalid requests get the JSON-RPC errors", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const errored = once(client, "error");
    ws.receive("{not json");
    assert.deepEqual(await ws.frame(), { jsonrpc: "2.0", id: null, error: { code: -32700, message: "Parse error" } });
    assert.equal((await errored).code, ErrorCode.PARSE_ERROR);
    ws.deliver([]);
    assert.equal((await ws.frame()).error.code, ErrorCode.INVALID_REQUEST);
    ws.deliver([1, { id: 3, method: "ping" }]);
    const answers = await ws.frame();
    assert.deepEqual(answers.map((answer) => answer.error.code), [-32600, -32600]);
    assert.equal(client.state, "open");
  });
});

describe("calls", () => {
  test("an error answer rejects with RpcError: code, message, data", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const calling = client.call("msg.history", { with: "bob" });
    const request = await ws.frame();
    assert.deepEqual(request, { jsonrpc: "2.0", id: request.id, method: "msg.history", params: { with: "bob" } });
    ws.deliver({ jsonrpc: "2.0", id: request.id, error: { code: -32005, message: "Unknown recipient", data: { unknown: ["bob"] } } });
    const error = await calling.catch((caught) => caught);
    assert.ok(error instanceof RpcError && error instanceof Error);
    assert.equal(error.name, "RpcError");
    assert.equal(error.code, ErrorCode.UNKNOWN_RECIPIENT);
    assert.equal(error.message, "Unknown recipient");
    assert.deepEqual(error.data, { unknown: ["bob"] });
  });

  test("ping has no params; an unasked error answer is an error event", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const pinging = client.ping();
    const request = await ws.frame();
    assert.deepEqual(request, { jsonrpc: "2.0", id: request.id, method: "ping" });
    ws.deliver({ jsonrpc: "2.0", id: request.id, result: "pong" });
    assert.equal(await pinging, "pong");
    const errored = once(client, "error");
    ws.deliver({ jsonrpc: "2.0", id: null, error: { code: -32600, message: "Invalid Request" } });
    assert.equal((await errored).code, -32600);
  });
});

describe("events", () => {
  test("on() returns an unsubscribe function; a throwing listener is an error event", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const seen = [];
    const off = client.on("message", (msg) => seen.push(msg.id));
    ws.deliver(recv("m1"));
    await ws.frame();
    off();
    ws.deliver(recv("m2"));
    await ws.frame();
    assert.deepEqual(seen, ["m1"]);
    client.on("close", () => {
      throw new Error("listener bug");
    });
    const errored = once(client, "error");
    ws.drop(1006);
    assert.equal((await errored).message, "listener bug");
    assert.throws(() => client.on("nope", () => {}), TypeError);
  });

  test("the constructor wants a token and a WebSocket", () => {
    assert.throws(() => new DevastatorClient(URL, { WebSocket: fakeWebSocket().WebSocket }), TypeError);
    if (typeof globalThis.WebSocket !== "function") assert.throws(() => new DevastatorClient(URL, { token: "t" }), /WebSocket/);
  });
});

describe("browser network events", () => {
  /** A window-like globalThis.addEventListener for the test; returns a function to dispatch. */
  function windowEvents(t) {
    const target = new EventTarget();
    globalThis.addEventListener = target.addEventListener.bind(target);
    globalThis.removeEventListener = target.removeEventListener.bind(target);
    t.after(() => {
      delete globalThis.addEventListener;
      delete globalThis.removeEventListener;
    });
    return (type) => target.dispatchEvent(new Event(type));
  }

  test("offline closes the socket and waits; online dials at once; close() stops listening", OPTIONS, async (t) => {
    const dispatch = windowEvents(t);
    const delays = recordDelays(t);
    const { fake, client, ws } = await connected(t, { reconnect: { minDelayMs: 60000, maxDelayMs: 60000 } });
    const closed = once(client, "close");
    dispatch("offline");
    assert.deepEqual(await closed, { code: 1000, reason: "offline", willReconnect: true });
    assert.equal(ws.closedByClient.code, 1000);
    assert.equal(client.state, "connecting");
    assert.deepEqual(delays, [], "no timer while offline");
    const sending = client.send("bob", "written offline");
    dispatch("online");
    const again = await fake.next();
    await again.authenticate();
    const request = await again.frame();
    again.deliver({ jsonrpc: "2.0", id: request.id, result: { id: "m1", ts: 1 } });
    assert.deepEqual(await sending, { id: "m1", ts: 1 });
    assert.deepEqual(delays, []);
    client.close();
    dispatch("online");
    assert.equal(fake.all.length, 2);
  });

  test("online while waiting for the backoff dials at once", OPTIONS, async (t) => {
    const dispatch = windowEvents(t);
    const { fake, client, ws } = await connected(t, { reconnect: { minDelayMs: 60000, maxDelayMs: 60000 } });
    t.mock.method(Math, "random", () => 1);
    ws.drop(1006);
    dispatch("online");
    await (await fake.next()).authenticate();
    assert.equal(client.state, "open");
  });
});

/** A msg.receipt request as the server sends it: the JSON-RPC id is the receipt id. */
function receiptRequest(message, type = "delivered", by = "bob", ts = 10) {
  const id = `${message}.${type === "read" ? "r" : "d"}.${by}`;
  return { jsonrpc: "2.0", id, method: "msg.receipt", params: { id, type, message, by, ts } };
}

/** Answer the request with a result. */
function answer(ws, request, result) {
  ws.deliver({ jsonrpc: "2.0", id: request.id, result });
}

describe("receipts", () => {
  test("send() passes receipt in the msg.send params when given", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const asked = client.send("bob", "hi", { cid: "c1", receipt: true });
    const notAsked = client.send("bob", "hi", { cid: "c2", receipt: false });
    const plain = client.send("bob", "hi", { cid: "c3" });
    const [a, b, c] = [await ws.frame(), await ws.frame(), await ws.frame()];
    assert.deepEqual(a.params, { to: "bob", message: "hi", cid: "c1", receipt: true });
    assert.deepEqual(b.params, { to: "bob", message: "hi", cid: "c2", receipt: false });
    assert.deepEqual(c.params, { to: "bob", message: "hi", cid: "c3" }, "no receipt field unless asked");
    for (const [n, request] of [a, b, c].entries()) answer(ws, request, { id: `m${n}`, ts: n });
    await Promise.all([asked, notAsked, plain]);
  });

  test("msg.receipt: the listener gets the params, the ACK waits for its promise", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    let release;
    const released = new Promise((resolve) => (release = resolve));
    const got = [];
    client.on("receipt", async (receipt) => {
      got.push(receipt);
      await released;
    });
    const request = receiptRequest("m1");
    ws.deliver(request);
    await new Promise((resolve) => setImmediate(resolve));
    assert.deepEqual(got, [{ id: "m1.d.bob", type: "delivered", message: "m1", by: "bob", ts: 10 }]);
    assert.equal(ws.unread, 0, "no ACK before the listener's promise resolves");
    release();
    assert.deepEqual(await ws.frame(), ack("m1.d.bob"));
  });

  test("receipts and messages in one batch: listeners one at a time, in order, one batch of ACKs", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const order = [];
    client.on("message", async (msg) => {
      await new Promise((resolve) => setTimeout(resolve, 5));
      order.push(`message ${msg.id}`);
    });
    client.on("receipt", (receipt) => order.push(`receipt ${receipt.id}`));
    ws.deliver([recv("m1"), receiptRequest("m0", "read"), recv("m2"), receiptRequest("m1")]);
    assert.deepEqual(await ws.frame(), [ack("m1"), ack("m0.r.bob"), ack("m2"), ack("m1.d.bob")]);
    assert.deepEqual(order, ["message m1", "receipt m0.r.bob", "message m2", "receipt m1.d.bob"]);
  });

  test("a duplicate receipt is ACKed again but not handed over, across reconnects; the set is bounded", OPTIONS, async (t) => {
    const { fake, client, ws } = await connected(t, { dedupeSize: 2 });
    const seen = [];
    client.on("receipt", (receipt) => seen.push(receipt.id));
    ws.deliver([receiptRequest("a"), receiptRequest("a")]);
    assert.deepEqual(await ws.frame(), [ack("a.d.bob"), ack("a.d.bob")]);
    ws.drop(1006);
    const again = await fake.next();
    await again.authenticate({ user: "alice", device: "phone", pending: 2 });
    again.deliver([receiptRequest("a"), receiptRequest("b")]);
    assert.deepEqual(await again.frame(), [ack("a.d.bob"), ack("b.d.bob")]);
    assert.deepEqual(seen, ["a.d.bob", "b.d.bob"]);
    again.deliver(receiptRequest("c")); // a is the oldest of the 2 kept: forgotten
    await again.frame();
    again.deliver(receiptRequest("a"));
    await again.frame();
    assert.deepEqual(seen, ["a.d.bob", "b.d.bob", "c.d.bob", "a.d.bob"]);
  });

  test("receipt ids and message ids are remembered apart", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const seen = [];
    client.on("message", (msg) => seen.push(`message ${msg.id}`));
    client.on("receipt", (receipt) => seen.push(`receipt ${receipt.id}`));
    const same = { ...receiptRequest("x"), id: "m1", params: { ...receiptRequest("x").params, id: "m1" } };
    ws.deliver([recv("m1"), same]);
    await ws.frame();
    assert.deepEqual(seen, ["message m1", "receipt m1"]);
  });

  test("a receipt listener that throws: error event, -32603 instead of the ACK, and the redelivery is handed over", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    let calls = 0;
    client.on("receipt", async () => {
      calls += 1;
      if (calls === 1) throw new Error("database locked");
    });
    const errored = once(client, "error");
    ws.deliver(receiptRequest("m1", "read"));
    assert.equal((await errored).message, "database locked");
    const failed = await ws.frame();
    assert.equal(failed.id, "m1.r.bob");
    assert.equal(failed.error.code, ErrorCode.INTERNAL_ERROR);
    assert.match(failed.error.message, /receipt handler failed: database locked/);
    ws.deliver(receiptRequest("m1", "read"));
    assert.deepEqual(await ws.frame(), ack("m1.r.bob"));
    assert.equal(calls, 2);
  });

  test("without a receipt listener a receipt is ACKed (no longer -32601), and the message listener never sees it", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const messages = [];
    client.on("message", (msg) => messages.push(msg));
    ws.deliver(receiptRequest("m1"));
    assert.deepEqual(await ws.frame(), ack("m1.d.bob"));
    assert.deepEqual(messages, []);
  });
});

describe("copies from the user's other devices", () => {
  test("user and device are the auth result's; a msg.recv from the user itself goes to the message listener", OPTIONS, async (t) => {
    const { fake, client } = setup(t);
    assert.equal(client.user, null);
    assert.equal(client.device, null);
    const connecting = client.connect();
    await (await fake.next()).authenticate({ user: "alice", device: "laptop", pending: 1 });
    await connecting;
    const ws = fake.all[0];
    assert.equal(client.user, "alice");
    assert.equal(client.device, "laptop");
    const received = once(client, "message");
    ws.deliver(recv("m1", { text: "from my phone" }, { from: "alice", to: ["bob", "carol"] }));
    const msg = await received;
    assert.equal(msg.from, client.user, "from === client.user: sent by this user from another device");
    assert.deepEqual(msg.to, ["bob", "carol"]);
    assert.deepEqual(await ws.frame(), ack("m1"));
    ws.drop(1006);
    assert.equal(client.user, "alice", "kept while reconnecting");
  });
});

describe("signals", () => {
  test("a msg.signal notification goes to the signal listeners and is not answered", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const signals = [];
    const messages = [];
    client.on("signal", (signal) => signals.push(signal));
    client.on("message", (msg) => messages.push(msg));
    const params = { from: "bob", to: "alice", signal: { typing: true }, ts: 5 };
    ws.deliver({ jsonrpc: "2.0", method: "msg.signal", params });
    ws.deliver([{ jsonrpc: "2.0", method: "msg.signal", params: { ...params, signal: { typing: false } } }]);
    ws.deliver({ jsonrpc: "2.0", method: "msg.signal", params: "not an object" });
    ws.deliver({ jsonrpc: "2.0", id: 1, method: "ping" });
    assert.deepEqual(await ws.frame(), { jsonrpc: "2.0", id: 1, result: "pong" }, "nothing was written for the signals");
    assert.deepEqual(signals, [params, { ...params, signal: { typing: false } }]);
    assert.deepEqual(messages, []);
  });

  test("a signal listener that throws is an error event; the others still get it", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const got = [];
    client.on("signal", () => {
      throw new Error("render bug");
    });
    client.on("signal", (signal) => got.push(signal.signal));
    const errored = once(client, "error");
    ws.deliver({ jsonrpc: "2.0", method: "msg.signal", params: { from: "bob", to: "alice", signal: 1, ts: 1 } });
    assert.equal((await errored).message, "render bug");
    assert.deepEqual(got, [1]);
    assert.equal(client.state, "open");
  });

  test("signal(): a msg.signal request that resolves with ACK", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const signalling = client.signal(["bob", "carol"], { typing: true });
    const request = await ws.frame();
    assert.deepEqual(request, { jsonrpc: "2.0", id: request.id, method: "msg.signal", params: { to: ["bob", "carol"], signal: { typing: true } } });
    answer(ws, request, "ACK");
    assert.equal(await signalling, "ACK");
  });

  for (const [code, data] of [[ErrorCode.OVERLOADED, { retry_after_ms: 50 }], [ErrorCode.TOO_LARGE, undefined], [ErrorCode.INVALID_PARAMS, undefined]]) {
    test(`signal() answered ${code} rejects with RpcError`, OPTIONS, async (t) => {
      const { client, ws } = await connected(t);
      const signalling = client.signal("bob", "x");
      const request = await ws.frame();
      ws.deliver({ jsonrpc: "2.0", id: request.id, error: { code, message: "no", ...(data ? { data } : {}) } });
      await assert.rejects(signalling, (error) => error instanceof RpcError && error.code === code && (data === undefined || error.data.retry_after_ms === 50));
      assert.equal(client.state, "open");
    });
  }

  test("signal() when not connected rejects at once with ConnectionError and is never sent later", OPTIONS, async (t) => {
    const { fake, client } = setup(t, { reconnect: { minDelayMs: 60000, maxDelayMs: 60000 } });
    await assert.rejects(client.signal("bob", { typing: true }), (error) => error instanceof ConnectionError && /not connected/.test(error.message));
    const connecting = client.connect();
    await assert.rejects(client.signal("bob", { typing: true }), ConnectionError, "connecting is not connected");
    const ws = await fake.next();
    await ws.authenticate();
    await connecting;
    const pinging = client.ping();
    const request = await ws.frame();
    assert.equal(request.method, "ping", "the signals were not queued");
    answer(ws, request, "pong");
    await pinging;

    t.mock.method(Math, "random", () => 1);
    ws.drop(1006, "gone");
    assert.equal(client.state, "connecting");
    await assert.rejects(client.signal("bob", 1), (error) => error instanceof ConnectionError && error.code === 1006 && error.reason === "gone");
    client.close();
    await assert.rejects(client.signal("bob", 1), (error) => error instanceof ConnectionError && error.code === 1000);
  });

  test("a signal in flight when the connection drops rejects and is not sent again", OPTIONS, async (t) => {
    const { fake, client, ws } = await connected(t);
    const signalling = client.signal("bob", { typing: true });
    assert.equal((await ws.frame()).method, "msg.signal");
    ws.drop(1006);
    await assert.rejects(signalling, (error) => error instanceof ConnectionError && error.code === 1006);
    const again = await fake.next();
    await again.authenticate();
    const pinging = client.ping();
    const request = await again.frame();
    assert.equal(request.method, "ping");
    answer(again, request, "pong");
    await pinging;
  });

  test("a signal JSON cannot carry is refused at once", OPTIONS, async (t) => {
    const { client } = await connected(t);
    await assert.rejects(client.signal("bob", { n: 1n }), TypeError);
  });
});

describe("markRead", () => {
  test("msg.read {ids}, resolves with ACK", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const marking = client.markRead(["m1", "m2"]);
    const request = await ws.frame();
    assert.deepEqual(request, { jsonrpc: "2.0", id: request.id, method: "msg.read", params: { ids: ["m1", "m2"] } });
    answer(ws, request, "ACK");
    assert.equal(await marking, "ACK");
  });

  test("made while disconnected it waits in the queue, and one in flight when the connection drops goes again", OPTIONS, async (t) => {
    const { fake, client } = setup(t);
    const early = client.markRead(["m1"]);
    const connecting = client.connect();
    const ws = await fake.next();
    await ws.authenticate();
    await connecting;
    const first = await ws.frame();
    assert.deepEqual(first.params, { ids: ["m1"] });
    const inFlight = client.markRead(["m2"]);
    assert.deepEqual((await ws.frame()).params, { ids: ["m2"] });
    ws.drop(1006); // neither was answered
    const again = await fake.next();
    await again.authenticate();
    const resent = [await again.frame(), await again.frame()];
    assert.deepEqual(resent.map((request) => [request.method, request.params.ids]), [["msg.read", ["m1"]], ["msg.read", ["m2"]]]);
    for (const request of resent) answer(again, request, "ACK");
    assert.deepEqual(await Promise.all([early, inFlight]), ["ACK", "ACK"]);
  });

  test("errors reject with RpcError; ids that are not an array are a TypeError", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const marking = client.markRead(new Array(1001).fill("m"));
    const request = await ws.frame();
    ws.deliver({ jsonrpc: "2.0", id: request.id, error: { code: ErrorCode.TOO_LARGE, message: "too many ids" } });
    await assert.rejects(marking, (error) => error instanceof RpcError && error.code === ErrorCode.TOO_LARGE);
    await assert.rejects(client.markRead("m1"), TypeError);
    assert.equal(ws.unread, 0, "nothing sent for a bad argument");
  });
});

describe("history", () => {
  const page = {
    messages: [
      { id: "m2", from: "bob", to: "alice", message: "newer", ts: 2, expires: 9 },
      { id: "m1", from: "alice", to: "bob", message: "older", ts: 1, expires: 9 },
    ],
    more: true,
  };

  test("msg.history {with, before, limit}: resolves with the page", OPTIONS, async (t) => {
    const { client, ws } = await connected(t);
    const first = client.history("bob", { limit: 2 });
    const request = await ws.frame();
    assert.deepEqual(request, { jsonrpc: "2.0", id: request.id, method: "msg.history", params: { with: "bob", limit: 2 } });
    answer(ws, request, page);
    assert.deepEqual(await first, page);
    const older = client.history("bob", { before: "m1", limit: 50 });
    const next = await ws.frame();
    assert.deepEqual(next.params, { with: "bob", before: "m1", limit: 50 });
    answer(ws, next, { messages: [], more: false });
    assert.deepEqual(await older, { messages: [], more: false });
    const plain = client.history("bob", { before: null });
    const third = await ws.frame();
    assert.deepEqual(third.params, { with: "bob" }, "no before or limit unless given");
    answer(ws, third, { messages: [], more: false });
    await plain;
  });

  for (const [code, data] of [[ErrorCode.METHOD_NOT_FOUND, undefined], [ErrorCode.UNKNOWN_RECIPIENT, { unknown: ["nobody"] }], [ErrorCode.INVALID_PARAMS, undefined]]) {
    test(`history answered ${code} rejects with RpcError`, OPTIONS, async (t) => {
      const { client, ws } = await connected(t);
      const asking = client.history("nobody");
      const request = await ws.frame();
      ws.deliver({ jsonrpc: "2.0", id: request.id, error: { code, message: "no", ...(data ? { data } : {}) } });
      const error = await asking.catch((caught) => caught);
      assert.ok(error instanceof RpcError);
      assert.equal(error.code, code);
      assert.deepEqual(error.data, data);
    });
  }

  test("a history request in flight when the connection drops is asked again after the reconnect", OPTIONS, async (t) => {
    const { fake, client, ws } = await connected(t);
    const asking = client.history("bob", { limit: 10 });
    const request = await ws.frame();
    ws.drop(1006);
    const again = await fake.next();
    await again.authenticate();
    const resent = await again.frame();
    assert.deepEqual(resent.params, request.params);
    answer(again, resent, page);
    assert.deepEqual(await asking, page);
  });
});
