// The client against the real server, for what protocol version 1.1 adds
// (PROTOCOL.md section 7): receipts, copies to the sender's other devices,
// signals, msg.read and history, each through the client's own API.
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { ConnectionError, ErrorCode, RpcError } from "../index.js";
import { acksOf, cleanups, flat, newClient, pendingOf, serve, waitFor } from "./real-server-helpers.js";

const OPTIONS = { timeout: 30000 };

const rejectsWith = (promise, code) =>
  assert.rejects(promise, (error) => error instanceof RpcError && error.code === code && typeof error.message === "string");

/** The receipts of `who` about message id, by type. */
function receiptsOf(who, id, type) {
  return who.receipts.filter((receipt) => receipt.message === id && receipt.type === type);
}

describe("receipts against the real server", () => {
  test("delivered when a device of the recipient ACKs, read after markRead: once per type, to each of the sender's devices", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    const laptop = newClient(defer, holder, "alice", "laptop");
    const phone = newClient(defer, holder, "alice", "phone");
    const bobPhone = newClient(defer, holder, "bob", "phone");
    const bobTablet = newClient(defer, holder, "bob", "tablet");
    await Promise.all([laptop, phone, bobPhone, bobTablet].map((who) => who.client.connect()));

    const plain = await laptop.client.send("bob", { text: "no receipts asked" });
    const asked = await laptop.client.send("bob", { text: "tell me" }, { receipt: true });
    for (const alice of [laptop, phone]) {
      const [delivered] = await waitFor(() => receiptsOf(alice, asked.id, "delivered").length && receiptsOf(alice, asked.id, "delivered"), "the delivered receipt");
      assert.deepEqual(delivered, { id: `${asked.id}.d.bob`, type: "delivered", message: asked.id, by: "bob", ts: delivered.ts });
      assert.equal(typeof delivered.ts, "number");
      const request = flat(alice.frames.received).find((frame) => frame.method === "msg.receipt");
      assert.equal(request.id, delivered.id, "the JSON-RPC id of msg.receipt is the receipt id");
      await waitFor(() => acksOf(alice.frames.sent, delivered.id) >= 1, "the ACK of the receipt");
    }

    await waitFor(() => bobTablet.messages.length === 2 && bobPhone.messages.length === 2, "both of bob's devices got both");
    assert.equal(await bobPhone.client.markRead([plain.id, asked.id]), "ACK");
    assert.equal(await bobTablet.client.markRead([asked.id]), "ACK", "read again on another device");
    for (const alice of [laptop, phone]) {
      const [read] = await waitFor(() => receiptsOf(alice, asked.id, "read").length && receiptsOf(alice, asked.id, "read"), "the read receipt");
      assert.deepEqual(read, { id: `${asked.id}.r.bob`, type: "read", message: asked.id, by: "bob", ts: read.ts });
    }

    // A marker: once its receipts are in, any receipt stored before them has come too.
    const marker = await laptop.client.send("bob", "marker", { receipt: true });
    await waitFor(() => bobPhone.messages.some((msg) => msg.id === marker.id), "the marker");
    await bobPhone.client.markRead([marker.id]);
    for (const alice of [laptop, phone]) {
      await waitFor(() => receiptsOf(alice, marker.id, "read").length, "the marker's read receipt");
      assert.equal(receiptsOf(alice, asked.id, "delivered").length, 1, "one delivered receipt for two devices of bob");
      assert.equal(receiptsOf(alice, asked.id, "read").length, 1, "one read receipt for two reads");
      assert.equal(alice.receipts.filter((receipt) => receipt.message === plain.id).length, 0, "no receipt for a send that did not ask");
      assert.equal(flat(alice.frames.received).filter((frame) => frame.method === "msg.receipt").length, alice.receipts.length, "each receipt came once");
    }
    assert.deepEqual(bobPhone.receipts, [], "the recipient gets no receipts");
    laptop.client.close();
    assert.equal(await pendingOf(defer, holder, "alice", "laptop"), 0, "every receipt was ACKed");
  });

  test("an offline sender gets its receipts in the auth backlog when it comes back, each handed over once", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    holder.server.token("bob", "phone"); // bob's device exists, offline
    const alice = newClient(defer, holder, "alice", "laptop");
    await alice.client.connect();
    const { id } = await alice.client.send("bob", { text: "read me later" }, { receipt: true });
    alice.client.close();

    const bob = newClient(defer, holder, "bob", "phone");
    await bob.client.connect();
    await waitFor(() => bob.messages.some((msg) => msg.id === id), "bob's message");
    await waitFor(() => acksOf(bob.frames.sent, id) === 1, "bob's ACK");
    assert.equal(await bob.client.markRead([id]), "ACK"); // answered once stored

    const back = newClient(defer, holder, "alice", "laptop");
    const auth = await back.client.connect();
    assert.ok(auth.pending >= 1, `pending ${auth.pending}`);
    await waitFor(() => back.receipts.length === 2, "both receipts");
    assert.deepEqual(back.receipts.map((receipt) => receipt.id).sort(), [`${id}.d.bob`, `${id}.r.bob`]);
    const backlog = back.frames.received[1];
    assert.ok(Array.isArray(backlog), "the backlog is one batch");
    assert.ok(backlog.some((request) => request.method === "msg.receipt" && request.id === `${id}.r.bob`), "the read receipt is in it");
    await waitFor(() => acksOf(back.frames.sent, `${id}.r.bob`) === 1, "its ACK");
    back.client.close();
    assert.equal(await pendingOf(defer, holder, "alice", "laptop"), 0);
  });

  test("a receipt listener that throws: -32603, the receipt comes again after the ACK timeout and is handed over then", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer, { DEVASTATOR_ACK_TIMEOUT: "0.5" });
    const alice = newClient(defer, holder, "alice", "laptop");
    let calls = 0;
    alice.client.on("receipt", () => {
      calls += 1;
      if (calls === 1) throw new Error("not now");
    });
    const errors = [];
    alice.client.on("error", (error) => errors.push(error));
    const bob = newClient(defer, holder, "bob", "phone");
    await Promise.all([alice.client.connect(), bob.client.connect()]);
    const { id } = await alice.client.send("bob", "hi", { receipt: true });
    const receiptId = `${id}.d.bob`;
    const refusal = await waitFor(() => flat(alice.frames.sent).find((frame) => frame.id === receiptId && frame.error), "the error answer");
    assert.equal(refusal.error.code, ErrorCode.INTERNAL_ERROR);
    assert.equal(errors[0]?.message, "not now");
    await waitFor(() => acksOf(alice.frames.sent, receiptId) === 1, "the ACK of the redelivery");
    assert.equal(calls, 2);
    assert.equal(alice.client.state, "open");
    alice.client.close();
    assert.equal(await pendingOf(defer, holder, "alice", "laptop"), 0);
  });
});

describe("copies against the real server", () => {
  test("a message goes to the sender's other devices as msg.recv from the sender, not to the sending device", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    holder.server.token("carol", "phone");
    const laptop = newClient(defer, holder, "alice", "laptop");
    const phone = newClient(defer, holder, "alice", "phone");
    const bob = newClient(defer, holder, "bob", "phone");
    await Promise.all([laptop, phone, bob].map((who) => who.client.connect()));
    assert.equal(phone.client.user, "alice");

    const one = await laptop.client.send("bob", { text: "to bob" });
    const group = await laptop.client.send(["bob", "carol"], { text: "to both" });
    await waitFor(() => phone.messages.length === 2, "the copies on alice's phone");
    assert.deepEqual(
      phone.messages.map(({ id, from, to, message }) => ({ id, from, to, message })),
      [
        { id: one.id, from: "alice", to: "bob", message: { text: "to bob" } },
        { id: group.id, from: "alice", to: ["bob", "carol"], message: { text: "to both" } },
      ],
    );
    assert.ok(phone.messages.every((msg) => msg.from === phone.client.user), "from === client.user: sent from another device");
    await waitFor(() => bob.messages.length === 2, "bob's messages");
    assert.deepEqual(bob.messages.map((msg) => [msg.id, msg.to]), [[one.id, "bob"], [group.id, "bob"]], "the same ids as the copies");

    // A marker from the phone: the laptop gets its copy, and had none of its own sends before it.
    const marker = await phone.client.send("bob", { text: "from the phone" });
    await waitFor(() => laptop.messages.length >= 1, "the copy on the laptop");
    assert.deepEqual(laptop.messages.map((msg) => [msg.id, msg.from, msg.to]), [[marker.id, "alice", "bob"]]);
    await waitFor(() => acksOf(phone.frames.sent, group.id) === 1, "the phone's ACK of the copy");
    phone.client.close();
    assert.equal(await pendingOf(defer, holder, "alice", "phone"), 0, "the copies were ACKed");
  });
});

describe("signals against the real server", () => {
  test("to the recipients' connected devices only, never stored, bounded in size and rate", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer, { DEVASTATOR_SIGNAL_RATE: "1", DEVASTATOR_SIGNAL_BURST: "4", DEVASTATOR_MAX_SIGNAL_BYTES: "100" });
    const laptop = newClient(defer, holder, "alice", "laptop");
    const phone = newClient(defer, holder, "alice", "phone");
    const bob = newClient(defer, holder, "bob", "phone");
    await Promise.all([laptop, phone, bob].map((who) => who.client.connect()));

    assert.equal(await laptop.client.signal("bob", { typing: true }), "ACK");
    const [signal] = await waitFor(() => bob.signals.length && bob.signals, "bob's signal");
    assert.deepEqual(signal, { from: "alice", to: "bob", signal: { typing: true }, ts: signal.ts });
    assert.equal(typeof signal.ts, "number");
    const notification = bob.frames.received.find((frame) => frame.method === "msg.signal");
    assert.equal("id" in notification, false, "a notification");

    assert.equal(await laptop.client.signal("alice", { typing: false }), "ACK");
    await waitFor(() => phone.signals.length === 1, "the signal to alice's other device");
    assert.deepEqual(phone.signals[0].signal, { typing: false });
    assert.equal(phone.signals[0].to, "alice");

    await rejectsWith(laptop.client.signal("bob", "x".repeat(200)), ErrorCode.TOO_LARGE);
    await rejectsWith(laptop.client.signal("bad id!", 1), ErrorCode.INVALID_PARAMS);

    // Offline: the signal is ACKed and lost; bob's next connection never sees it.
    bob.client.close();
    assert.equal(await laptop.client.signal("bob", { typing: true }), "ACK");
    const back = newClient(defer, holder, "bob", "phone");
    assert.equal((await back.client.connect()).pending, 0);
    const marker = await laptop.client.send("bob", "marker");
    await waitFor(() => back.messages.some((msg) => msg.id === marker.id), "the marker");
    assert.deepEqual(back.signals, []);
    assert.equal(await back.client.ping(), "pong");
    assert.deepEqual(back.signals, []);

    // A flood: the rate limit answers -32003 with retry_after_ms, and the connection stays.
    const flood = await Promise.allSettled(Array.from({ length: 12 }, () => laptop.client.signal("bob", { typing: true })));
    const refused = flood.filter((result) => result.status === "rejected").map((result) => result.reason);
    assert.ok(refused.length >= 1, "some were refused");
    for (const error of refused) {
      assert.ok(error instanceof RpcError && error.code === ErrorCode.OVERLOADED, String(error));
      assert.ok(error.data.retry_after_ms > 0);
    }
    assert.ok(flood.filter((result) => result.status === "fulfilled").length <= 6, "at most the burst and what refilled");
    assert.equal(laptop.client.state, "open");
    assert.equal(laptop.signals.length, 0, "the sending connection never gets its own signals");
    assert.ok(bob.frames.sent.every((frame) => !Array.isArray(frame) && frame.method), "signals were never answered");

    laptop.client.close();
    await assert.rejects(laptop.client.signal("bob", 1), ConnectionError);
  });
});

describe("msg.read against the real server", () => {
  test("ids the caller was not sent are ignored; bad ids and too many are refused", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer, { DEVASTATOR_MAX_READ_IDS: "3" });
    const alice = newClient(defer, holder, "alice", "laptop");
    const bob = newClient(defer, holder, "bob", "phone");
    const carol = newClient(defer, holder, "carol", "phone");
    await Promise.all([alice, bob, carol].map((who) => who.client.connect()));
    const { id } = await alice.client.send("bob", "for bob", { receipt: true });
    await waitFor(() => receiptsOf(alice, id, "delivered").length, "the delivered receipt");
    assert.equal(await carol.client.markRead([id, "no-such-id"]), "ACK");
    await rejectsWith(bob.client.markRead([1]), ErrorCode.INVALID_PARAMS);
    await rejectsWith(bob.client.markRead(["a", "b", "c", "d"]), ErrorCode.TOO_LARGE);
    const marker = await alice.client.send("bob", "marker", { receipt: true });
    await waitFor(() => receiptsOf(alice, marker.id, "delivered").length, "the marker's receipt");
    assert.equal(receiptsOf(alice, id, "read").length, 0, "carol read what she was not sent: no receipt");
    assert.equal(await bob.client.markRead([id]), "ACK");
    await waitFor(() => receiptsOf(alice, id, "read").length === 1, "bob's read receipt");
  });
});

describe("history against the real server", () => {
  test("both directions, newest first, paged with before, complete; only the caller's conversations", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    const alice = newClient(defer, holder, "alice", "laptop");
    const bob = newClient(defer, holder, "bob", "phone");
    const carol = newClient(defer, holder, "carol", "phone");
    await Promise.all([alice, bob, carol].map((who) => who.client.connect()));
    const sent = [];
    for (let n = 0; n < 7; n++) {
      const [from, to] = n % 2 ? [bob, "alice"] : [alice, "bob"];
      const { id, ts } = await from.client.send(to, { n });
      sent.push({ id, ts, from: from.client.user, to, message: { n } });
    }
    const group = await alice.client.send(["bob", "carol"], { n: "group" });
    await carol.client.send("bob", { n: "carol to bob" });
    sent.push({ id: group.id, ts: group.ts, from: "alice", to: "bob", message: { n: "group" } });
    const newestFirst = [...sent].reverse();

    const pages = [];
    let before;
    for (;;) {
      const page = await alice.client.history("bob", { before, limit: 3 });
      pages.push(page);
      if (!page.more) break;
      before = page.messages.at(-1).id;
      assert.ok(pages.length < 10, "the pages end");
    }
    assert.deepEqual(pages.map((page) => page.messages.length), [3, 3, 2]);
    const all = pages.flatMap((page) => page.messages);
    assert.deepEqual(all.map(({ id, ts, from, to, message }) => ({ id, ts, from, to, message })), newestFirst);
    assert.ok(all.every((msg) => typeof msg.expires === "number"));

    const bobSide = await bob.client.history("alice");
    assert.deepEqual(bobSide.messages.map((msg) => msg.id), newestFirst.map((msg) => msg.id), "the same conversation from bob");
    assert.equal(bobSide.more, false);
    const carolSide = await carol.client.history("alice", { limit: 100 });
    assert.deepEqual(carolSide.messages.map((msg) => [msg.id, msg.to]), [[group.id, "carol"]], "carol sees only what she was part of");
    assert.deepEqual((await alice.client.history("alice")).messages, [], "alice wrote nothing to herself");

    const unknown = await alice.client.history("nobody-here").catch((error) => error);
    assert.ok(unknown instanceof RpcError);
    assert.equal(unknown.code, ErrorCode.UNKNOWN_RECIPIENT);
    assert.deepEqual(unknown.data, { unknown: ["nobody-here"] });
    await rejectsWith(alice.client.history("bad id!"), ErrorCode.INVALID_PARAMS);
    await rejectsWith(alice.client.history("bob", { limit: 101 }), ErrorCode.INVALID_PARAMS);
    assert.equal(alice.client.state, "open");
  });

  test("a history period of 0 turns msg.history off: -32601", OPTIONS, async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer, { DEVASTATOR_HISTORY_PERIOD: "0" });
    holder.server.token("bob", "phone");
    const alice = newClient(defer, holder, "alice", "laptop");
    await alice.client.connect();
    await alice.client.send("bob", "not kept in history");
    await rejectsWith(alice.client.history("bob"), ErrorCode.METHOD_NOT_FOUND);
    assert.equal(await alice.client.ping(), "pong");
  });
});
