// The client against the real server (bin/devastator as a subprocess on
// ephemeral ports): delivery, the backlog batch, dedupe, reconnects through a
// crash, error codes and the close codes that end a session.
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { ConnectionError, DevastatorClient, ErrorCode, RpcError } from "../index.js";
import { QUICK_RECONNECT, acksOf, cleanups, newClient, nextEvent, pendingOf, recordingWebSocket, serve, waitFor } from "./real-server-helpers.js";

const OPTIONS = { timeout: 30000 };

describe("against the real server", () => {
  test("connect() resolves with the auth result; ping answers pong", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    const opened = [];
    const { client } = newClient(defer, holder, "alice", "laptop");
    client.on("open", (result) => opened.push(result));
    assert.deepEqual(await client.connect(), { user: "alice", device: "laptop", pending: 0 });
    assert.equal(client.state, "open");
    assert.deepEqual(opened, [{ user: "alice", device: "laptop", pending: 0 }]);
    assert.equal(await client.ping(), "pong");
  });

  test("alice sends to bob: bob's handler gets it, the client ACKs it, nothing stays pending", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    const bob = newClient(defer, holder, "bob", "phone");
    const alice = newClient(defer, holder, "alice", "laptop");
    await Promise.all([bob.client.connect(), alice.client.connect()]);
    const received = nextEvent(bob.client, "message");
    const { id, ts } = await alice.client.send("bob", { text: "hello bob" });
    assert.equal(typeof id, "string");
    assert.equal(typeof ts, "number");
    const msg = await received;
    assert.equal(msg.id, id);
    assert.equal(msg.from, "alice");
    assert.equal(msg.to, "bob");
    assert.equal(msg.ts, ts);
    assert.deepEqual(msg.message, { text: "hello bob" });
    await waitFor(() => acksOf(bob.frames.sent, id) === 1, "bob's ACK");
    const request = bob.frames.received.find((frame) => frame.method === "msg.recv");
    assert.equal(request.id, id, "the JSON-RPC id of msg.recv is the message id");
    bob.client.close();
    assert.equal(await pendingOf(defer, holder, "bob", "phone"), 0);
  });

  test("the backlog: one batch after auth, handlers in order, one batch of ACKs", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    holder.server.token("bob", "phone"); // bob's device exists, offline
    const alice = newClient(defer, holder, "alice", "laptop");
    await alice.client.connect();
    const sent = [];
    for (const n of [1, 2, 3]) sent.push((await alice.client.send("bob", { n })).id);

    const bob = newClient(defer, holder, "bob", "phone");
    assert.deepEqual(await bob.client.connect(), { user: "bob", device: "phone", pending: 3 });
    await waitFor(() => bob.messages.length === 3, "the 3 pending messages");
    assert.deepEqual(bob.messages.map((msg) => msg.id), sent);
    assert.deepEqual(bob.messages.map((msg) => msg.message.n), [1, 2, 3]);

    const [authAnswer, backlog] = bob.frames.received;
    assert.equal(authAnswer.result.pending, 3);
    assert.ok(Array.isArray(backlog), "the backlog is one batch");
    assert.deepEqual(backlog.map((request) => [request.jsonrpc, request.method, request.id]), sent.map((id) => ["2.0", "msg.recv", id]));
    const ackBatch = await waitFor(() => bob.frames.sent.find((frame) => Array.isArray(frame)), "the batch of ACKs");
    assert.deepEqual(ackBatch, sent.map((id) => ({ jsonrpc: "2.0", id, result: "ACK" })));
    bob.client.close();
    assert.equal(await pendingOf(defer, holder, "bob", "phone"), 0);
  });

  test("a redelivery after the ACK timeout is ACKed again but handed over once", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer, { DEVASTATOR_ACK_TIMEOUT: "0.5" });
    const { WebSocket: Recording, frames } = recordingWebSocket();
    const bob = new DevastatorClient(holder.server.url, { token: holder.server.token("bob", "phone"), WebSocket: Recording, reconnect: QUICK_RECONNECT });
    defer(() => bob.close());
    const handled = [];
    const deliveriesOf = (id) => frames.received.filter((frame) => !Array.isArray(frame) && frame.method === "msg.recv" && frame.id === id).length;
    bob.on("message", async (msg) => {
      handled.push(msg.id);
      // Slow on purpose: not done until the server, tired of waiting for the ACK, sends it again.
      await waitFor(() => deliveriesOf(msg.id) >= 2, "the redelivery");
    });
    await bob.connect();
    const alice = newClient(defer, holder, "alice", "laptop");
    await alice.client.connect();
    const { id } = await alice.client.send("bob", "once only");
    await waitFor(() => acksOf(frames.sent, id) >= 2, "an ACK for each delivery");
    assert.deepEqual(handled, [id]);
    bob.close();
    assert.equal(await pendingOf(defer, holder, "bob", "phone"), 0);
    assert.deepEqual(handled, [id]);
  });

  test("SIGKILL and a restart on the same ports: sends in flight and queued arrive exactly once", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    const bob = newClient(defer, holder, "bob", "phone");
    const alice = newClient(defer, holder, "alice", "laptop");
    await Promise.all([bob.client.connect(), alice.client.connect()]);
    const sends = [alice.client.send("bob", { n: 1 })];
    await sends[0];

    const aliceClosed = nextEvent(alice.client, "close");
    // These may or may not reach the server before it dies: either way the
    // client sends them again with their cid, and each is stored once.
    for (const n of [2, 3, 4]) sends.push(alice.client.send("bob", { n }));
    await holder.server.kill();
    assert.equal((await aliceClosed).willReconnect, true);
    for (const n of [5, 6, 7]) sends.push(alice.client.send("bob", { n }));
    assert.equal(alice.client.state, "connecting");

    const reopened = nextEvent(alice.client, "open", 20000);
    holder.server = await holder.server.restart();
    await reopened;
    const results = await Promise.all(sends);
    const ids = results.map((result) => result.id);
    assert.equal(new Set(ids).size, 7, "seven messages, seven ids");

    // Order per recipient: once the marker is in, any copy stored before it has arrived.
    const marker = await alice.client.send("bob", { n: "marker" });
    await waitFor(() => bob.messages.some((msg) => msg.id === marker.id), "the marker", 20000);
    const numbers = bob.messages.map((msg) => msg.message.n).filter((n) => n !== "marker");
    assert.deepEqual([...numbers].sort(), [1, 2, 3, 4, 5, 6, 7], "each message once");
    assert.deepEqual(bob.messages.slice(0, 7).map((msg) => msg.id).sort(), [...ids].sort());
  });

  test("a clean shutdown (SIGTERM) closes with 1001 and the client comes back", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    const { client } = newClient(defer, holder, "alice", "laptop");
    await client.connect();
    const closed = nextEvent(client, "close");
    await holder.server.stop();
    const event = await closed;
    assert.deepEqual([event.code, event.willReconnect], [1001, true]);
    const reopened = nextEvent(client, "open", 20000);
    holder.server = await holder.server.restart();
    assert.equal((await reopened).user, "alice");
  });

  test("JSON-RPC errors reject with RpcError; the connection stays open", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    const { client } = newClient(defer, holder, "alice", "laptop");
    await client.connect();
    const rejectsWith = (promise, code) => assert.rejects(promise, (error) => error instanceof RpcError && error.code === code && typeof error.message === "string");
    await rejectsWith(client.send("bad id!", "hi"), ErrorCode.INVALID_PARAMS);
    await rejectsWith(client.send("alice", "x".repeat(70000)), ErrorCode.TOO_LARGE);
    const unknown = await client.send("nobody-here", "hi").catch((error) => error);
    assert.equal(unknown.code, ErrorCode.UNKNOWN_RECIPIENT);
    assert.deepEqual(unknown.data, { unknown: ["nobody-here"] });
    await rejectsWith(client.call("no.such.method"), ErrorCode.METHOD_NOT_FOUND);
    assert.equal(client.state, "open");
    assert.equal(await client.ping(), "pong");
  });

  test("a bad token: connect() rejects with -32002 and the client does not reconnect", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    let calls = 0;
    const client = new DevastatorClient(holder.server.url, {
      getToken: () => {
        calls += 1;
        return "not-a-jwt";
      },
      WebSocket,
      reconnect: QUICK_RECONNECT,
    });
    defer(() => client.close());
    const closed = nextEvent(client, "close");
    await assert.rejects(client.connect(), (error) => error instanceof RpcError && error.code === ErrorCode.FORBIDDEN);
    assert.equal(client.state, "closed");
    assert.equal((await closed).willReconnect, false);
    await assert.rejects(client.send("bob", "hi"), ConnectionError);
    assert.equal(calls, 1);
  });

  test("4001: the same device authenticating on another connection replaces this one, which stays closed", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    const first = newClient(defer, holder, "alice", "laptop");
    await first.client.connect();
    const closed = nextEvent(first.client, "close");
    const second = newClient(defer, holder, "alice", "laptop");
    await second.client.connect();
    const event = await closed;
    assert.deepEqual([event.code, event.willReconnect], [4001, false]);
    assert.equal(first.client.state, "closed");
    const notice = first.frames.received.find((frame) => frame.method === "conn.close");
    assert.equal(notice?.params?.code, 4001, "conn.close came first");
    assert.equal(second.client.state, "open");
    assert.equal(await second.client.ping(), "pong");
  });

  test("4002: removing the device closes its connection within 2 s, and the client stays closed", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    const { client } = newClient(defer, holder, "alice", "laptop");
    await client.connect();
    const closed = nextEvent(client, "close", 2500);
    const started = Date.now();
    holder.server.cli("device", "remove", "alice", "laptop");
    const event = await closed;
    assert.deepEqual([event.code, event.willReconnect], [4002, false]);
    assert.ok(Date.now() - started <= 2500, `closed after ${Date.now() - started} ms`);
    assert.equal(client.state, "closed");
  });
});
