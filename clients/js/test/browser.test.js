// The chat page in headless Chromium against a real server: two people chat,
// one goes offline, the server crashes and comes back, a page reloads, and the
// page works over wss:// with the server's CA trusted the way a user would
// trust it (an NSS database); delivered and read ticks, "typing...", history
// on a user's second page and copies of its own messages there. Screenshots
// go to test-artifacts/.
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import WebSocket from "ws";
import { DevastatorClient } from "../index.js";
import { startServer } from "./server.js";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = join(dirname(fileURLToPath(import.meta.url)), "..", "test-artifacts");
const WAIT_MS = 15000;
// After a server restart the pages reconnect with backoff: up to 20 s between attempts.
const RECONNECT_MS = 45000;
const LAUNCH_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  // Without these Chromium dials out on start, and this machine refuses that.
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

function missing(what, hint) {
  if (process.env.CI) return false; // under CI a missing tool fails the test instead (see requireTool)
  return existsSync(what) ? false : `${what} not found: ${hint}`;
}

function requireTool(what, hint) {
  if (!existsSync(what)) assert.fail(`${what} not found (${hint}); CI needs it`);
}

const skipBrowser = missing(CHROMIUM, "apt-get install chromium, or set CHROMIUM=/path/to/chromium");

/** Cleanups of a test, run last first after it, pass or fail. */
function cleanups(t) {
  const stack = [];
  t.after(async () => {
    for (const cleanup of stack.reverse()) {
      try {
        await cleanup();
      } catch (error) {
        console.error("cleanup failed:", error);
      }
    }
  });
  return (cleanup) => stack.push(cleanup);
}

/** A browser that the test closes, and a HOME of its own (Chromium keeps its NSS database there). */
async function launch(defer, home) {
  requireTool(CHROMIUM, "apt-get install chromium");
  if (!home) {
    home = mkdtempSync(join(tmpdir(), "devastator-chromium-"));
    defer(() => rmSync(home, { recursive: true, force: true }));
  }
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: LAUNCH_ARGS,
    env: { ...process.env, HOME: home },
  });
  defer(() => browser.close());
  return browser;
}

/** A server that the test kills and removes, whatever happens; `holder.server` follows restarts. */
async function serve(defer, options) {
  const holder = { server: await startServer(options) };
  defer(async () => {
    await holder.server.kill();
    holder.server.remove();
  });
  return holder;
}

/**
 * A page in a browser context of its own (no shared storage), its uncaught
 * errors collected; its last state is kept as test-artifacts/NAME.png.
 */
async function openPage(defer, browser, url, name) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  context.setDefaultTimeout(WAIT_MS);
  defer(() => context.close());
  const page = await context.newPage();
  page.name = name;
  page.errors = [];
  page.on("pageerror", (error) => page.errors.push(error));
  defer(() => screenshot(page, name));
  await page.goto(url);
  return page;
}

async function screenshot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

function waitForState(page, state, timeout = WAIT_MS) {
  return page.locator(`#state[data-state="${state}"]`).waitFor({ timeout });
}

async function openConversation(page, peer) {
  const existing = page.locator(`#conversations [data-peer="${peer}"]`);
  if (await existing.count()) {
    await existing.click();
  } else {
    await page.fill("#peer", peer);
    await page.press("#peer", "Enter");
  }
  await page.locator("#conversation-title", { hasText: peer }).waitFor();
}

async function say(page, text, { button = false } = {}) {
  await page.fill("#text", text);
  if (button) await page.click("#send");
  else await page.press("#text", "Enter");
  await page.locator("#messages li[data-cid]").filter({ hasText: text }).last().waitFor();
}

/** What the selected conversation shows: one row per <li>. */
function shown(page) {
  return page.$$eval("#messages li", (items) =>
    items.map((li) => ({
      id: li.dataset.id || null,
      status: li.dataset.status,
      from: li.classList.contains("own") ? "me" : li.querySelector(".from").textContent,
      text: li.querySelector(".text").textContent,
    })),
  );
}

/**
 * Wait until the page shows exactly these messages ([from, text] pairs, the
 * page's user being "me"), each stored (an id, "sent" or "received"); returns the ids.
 */
async function expectConversation(page, expected) {
  const want = expected.map(([from, text]) => ({ from, text, status: from === "me" ? "sent" : "received" }));
  await page
    .waitForFunction(
      (want) => {
        const items = [...document.querySelectorAll("#messages li")];
        return (
          items.length === want.length &&
          items.every((li, i) => li.dataset.id && li.dataset.status === want[i].status &&
            li.querySelector(".text").textContent === want[i].text)
        );
      },
      want,
      { timeout: WAIT_MS },
    )
    .catch(() => {}); // the assertion below says what differs
  const rows = await shown(page);
  assert.deepEqual(
    rows.map(({ from, text, status }) => ({ from, text, status })),
    want,
    `${page.name}'s conversation`,
  );
  const ids = rows.map((row) => row.id);
  assert.equal(new Set(ids).size, ids.length, `${page.name} shows a message twice: ${ids}`);
  return ids;
}

/** The conversation ([sender, text] pairs) as the user's page shows it. */
function seenBy(user, conversation) {
  return conversation.map(([from, text]) => [from === user ? "me" : from, text]);
}

/** Both sides show the same messages, in the same order, once each. */
async function expectBoth(alice, bob, conversation) {
  const aliceIds = await expectConversation(alice, seenBy("alice", conversation));
  const bobIds = await expectConversation(bob, seenBy("bob", conversation));
  assert.deepEqual(bobIds, aliceIds, "both pages show the same message ids in the same order");
}

/** A client that is not a browser: raw JSON-RPC over the ws package, to send what the page cannot. */
async function rawSend(url, token, to, message) {
  const ws = new WebSocket(url);
  const replies = new Map();
  ws.on("message", (data) => {
    const value = JSON.parse(String(data));
    for (const item of Array.isArray(value) ? value : [value]) if (item.id != null) replies.get(item.id)?.(item);
  });
  const call = (id, method, params) =>
    new Promise((resolve) => {
      replies.set(id, resolve);
      ws.send(JSON.stringify({ jsonrpc: "2.0", id, method, params }));
    });
  await new Promise((resolve, reject) => ws.once("open", resolve).once("error", reject));
  try {
    const auth = await call(1, "auth.jwt", { token });
    assert.ok(auth.result, `auth.jwt: ${JSON.stringify(auth.error)}`);
    const sent = await call(2, "msg.send", { to, message });
    assert.ok(sent.result, `msg.send: ${JSON.stringify(sent.error)}`);
    return sent.result;
  } finally {
    ws.close();
  }
}

describe("the chat page in Chromium", { skip: skipBrowser }, () => {
  test("alice and bob chat; every message shows once through offline, a server crash and a reload", async (t) => {
    const defer = cleanups(t);
    const holder = await serve(defer);
    const browser = await launch(defer);

    const stranger = await openPage(defer, browser, holder.server.pageUrl, "no-token");
    await waitForState(stranger, "signed-out");
    await stranger.locator("#signed-out", { hasText: "bin/devastator open USER" }).waitFor();
    const forged = await openPage(defer, browser, `${holder.server.pageUrl}#token=e30.e30.bad`, "bad-token");
    await forged.locator("#signed-out-reason", { hasText: "refused this sign-in link" }).waitFor();
    await waitForState(forged, "closed");

    // The URLs a newcomer gets from `bin/devastator open alice` and `open bob`: a new device each.
    const linkFor = (user) => holder.server.cli("open", user, "--http-port", String(holder.server.httpPort)).trim();
    const aliceLink = linkFor("alice");
    assert.match(aliceLink, /^http:\/\/localhost:\d+\/#token=[\w-]+\.[\w-]+\.[\w-]+$/);
    const alice = await openPage(defer, browser, aliceLink, "alice");
    const bob = await openPage(defer, browser, linkFor("bob"), "bob");
    for (const [page, user] of [[alice, "alice"], [bob, "bob"]]) {
      await waitForState(page, "online");
      assert.equal(await page.textContent("#user"), user);
      assert.match(await page.textContent("#device"), /^web-[0-9a-f]+$/);
      assert.ok(!page.url().includes("token"), `the token left ${user}'s address bar: ${page.url()}`);
    }

    // Live: each sends, each message shows once on both sides, as text (never as HTML).
    const conversation = [];
    await openConversation(alice, "bob");
    await say(alice, "hi bob");
    conversation.push(["alice", "hi bob"]);
    await bob.locator('#conversations [data-peer="alice"] .unread').waitFor();
    await openConversation(bob, "alice");
    await say(bob, "hi alice, fancy a <b>bold</b> test?", { button: true });
    conversation.push(["bob", "hi alice, fancy a <b>bold</b> test?"]);
    const html = `<img src=x onerror="window.injected = true">\nsecond line`;
    await say(alice, html);
    conversation.push(["alice", html]);
    await expectBoth(alice, bob, conversation);
    assert.equal(await bob.evaluate(() => window.injected), undefined, "message text was parsed as HTML");
    assert.equal(await bob.locator("#messages img, #messages b").count(), 0);

    // Bob's network goes away (Chromium's offline emulation: the `offline`
    // event, and no new connection can be made). Alice goes on writing; bob
    // writes too, and his messages wait in his page.
    await bob.context().setOffline(true);
    await waitForState(bob, "reconnecting");
    for (const text of ["a1 while bob is offline", "a2", "a3"]) {
      await say(alice, text);
      conversation.push(["alice", text]);
    }
    for (const text of ["b1 written offline", "b2"]) {
      await say(bob, text);
      assert.equal(await bob.locator("#messages li").filter({ hasText: text }).getAttribute("data-status"), "queued");
    }
    await expectConversation(alice, seenBy("alice", conversation));
    await screenshot(bob, "bob-offline");
    await bob.context().setOffline(false);
    await waitForState(bob, "online");
    conversation.push(["bob", "b1 written offline"], ["bob", "b2"]);
    await expectBoth(alice, bob, conversation);

    // The server crashes (SIGKILL) with both pages connected; both write while
    // it is down; it comes back on the same port and data.
    await holder.server.kill();
    await Promise.all([waitForState(alice, "reconnecting"), waitForState(bob, "reconnecting")]);
    await say(alice, "c1 while the server is down");
    await say(bob, "d1 while the server is down");
    for (const page of [alice, bob]) {
      assert.equal(await page.locator('#messages li[data-status="queued"]').count(), 1, `${page.name}'s queued send`);
    }
    holder.server = await holder.server.restart();
    await Promise.all([waitForState(alice, "online", RECONNECT_MS), waitForState(bob, "online", RECONNECT_MS)]);
    // Which page reconnected first decides which of the two the server stored first.
    await alice.waitForFunction(
      () => document.querySelectorAll('#messages li[data-status="sent"], #messages li[data-status="received"]').length === 10,
    );
    const last = (await shown(alice)).slice(-2).map((row) => row.text);
    assert.deepEqual([...last].sort(), ["c1 while the server is down", "d1 while the server is down"]);
    for (const text of last) conversation.push([text.startsWith("c1") ? "alice" : "bob", text]);
    await expectBoth(alice, bob, conversation);

    // A reload keeps the sign-in and the conversation, each message once.
    await bob.reload();
    await waitForState(bob, "online");
    assert.ok(!bob.url().includes("token"));
    await say(bob, "after a reload");
    conversation.push(["bob", "after a reload"]);
    await expectBoth(alice, bob, conversation);

    // Another client sends what the page cannot write: a JSON value that is
    // not {"text"}, and a {"text"} with markup; a new conversation shows up.
    const carolToken = holder.server.token("carol", "bot");
    await rawSend(holder.server.url, carolToken, "alice", { n: [1, 2], ok: true });
    await rawSend(holder.server.url, carolToken, "alice", { text: "<script>window.injected = true</script>" });
    await alice.locator('#conversations [data-peer="carol"] .unread', { hasText: "2" }).waitFor();
    await openConversation(alice, "carol");
    await expectConversation(alice, [
      ["carol", '{"n":[1,2],"ok":true}'],
      ["carol", "<script>window.injected = true</script>"],
    ]);
    assert.equal(await alice.evaluate(() => window.injected), undefined);

    // A user that does not exist: the send fails and says why.
    await openConversation(alice, "nobody-here");
    await say(alice, "hello?");
    const failed = alice.locator('#messages li[data-status="failed"]');
    await failed.waitFor();
    assert.match(await failed.locator(".error").textContent(), /no such user/);
    await screenshot(alice, "alice-unknown-user");

    await openConversation(alice, "bob"); // for its screenshot
    await bob.setViewportSize({ width: 360, height: 740 });
    await screenshot(bob, "bob-narrow");
    await bob.setViewportSize({ width: 1000, height: 700 });
    for (const page of [stranger, forged, alice, bob]) assert.deepEqual(page.errors, [], `${page.name}: uncaught errors`);
  });

  test("ticks, typing, history on a second page of the same user, and copies of its own messages there", async (t) => {
    const defer = cleanups(t);
    const { server } = await serve(defer);
    const browser = await launch(defer);
    const link = (user, device) => `${server.pageUrl}#token=${server.token(user, device)}`;
    const alice = await openPage(defer, browser, link("alice", "web-1"), "ticks-alice");
    const bob = await openPage(defer, browser, link("bob", "web-1"), "ticks-bob");
    await Promise.all([waitForState(alice, "online"), waitForState(bob, "online")]);
    for (const page of [alice, bob]) assert.equal(await page.evaluate(() => document.visibilityState), "visible");
    const ownRow = (page, text) => page.locator("#messages li.own").filter({ hasText: text });
    const conversation = [];

    // Delivered: bob's page took the message, but bob has not opened the conversation.
    await openConversation(alice, "bob");
    await say(alice, "hello bob");
    conversation.push(["alice", "hello bob"]);
    await bob.locator('#conversations [data-peer="alice"] .unread').waitFor();
    const hello = ownRow(alice, "hello bob");
    await alice.locator('#messages li[data-receipt="delivered"]', { hasText: "hello bob" }).waitFor();
    assert.equal(await hello.locator(".status").textContent(), "✓✓");
    assert.match(await hello.locator(".status").getAttribute("title"), /delivered: bob/);
    await screenshot(alice, "ticks-alice-delivered");

    // Read: bob opens the conversation, his page tells the server, alice's shows it.
    await openConversation(bob, "alice");
    await alice.locator('#messages li[data-receipt="read"]', { hasText: "hello bob" }).waitFor();
    assert.equal(await hello.locator(".status").textContent(), "✓✓ read");
    const colours = await alice.evaluate(() => {
      const status = document.querySelector('#messages li[data-receipt="read"] .status');
      return [getComputedStyle(status).color, getComputedStyle(status.closest(".meta")).color];
    });
    assert.notEqual(colours[0], colours[1], "a read tick is coloured");
    await screenshot(alice, "ticks-alice-read");

    // Typing: shown while bob types, gone a few seconds after he stops.
    await bob.locator("#text").pressSequentially("on my way", { delay: 20 });
    const typing = alice.locator("#typing");
    await alice.locator("#typing", { hasText: "bob is typing..." }).waitFor();
    await screenshot(alice, "typing-alice");
    const shownAt = Date.now();
    await typing.waitFor({ state: "hidden", timeout: 8000 });
    const shownFor = Date.now() - shownAt;
    assert.ok(shownFor >= 1500 && shownFor <= 6000, `"typing..." shown for ${shownFor} ms`);
    // Typing again, then the message: it ends "typing..." at once, not after the timeout.
    await bob.locator("#text").pressSequentially(" now", { delay: 20 });
    await alice.locator("#typing", { hasText: "bob is typing..." }).waitFor();
    await bob.press("#text", "Enter");
    conversation.push(["bob", "on my way now"]);
    await typing.waitFor({ state: "hidden", timeout: 2500 });
    await alice.locator("#messages li").filter({ hasText: "on my way now" }).waitFor();
    // Alice has the conversation open: bob's own message gets its read tick.
    await bob.locator('#messages li[data-receipt="read"]', { hasText: "on my way now" }).waitFor();

    // More than a page of history: bob sends from another device of his (a bot),
    // so his page shows those as his own, copies from his other device.
    const bot = new DevastatorClient(server.url, { token: server.token("bob", "bot"), WebSocket, reconnect: false });
    defer(() => bot.close());
    await bot.connect();
    for (let n = 1; n <= 55; n++) {
      await bot.send("alice", { text: `bulk ${n}` });
      conversation.push(["bob", `bulk ${n}`]);
    }
    bot.close();
    await expectBoth(alice, bob, conversation);
    assert.equal(await bob.locator("#messages li.own").filter({ hasText: "bulk 55" }).count(), 1, "a copy from bob's bot shows as his own");

    // Alice's second page, opened after all that: the conversation comes from history,
    // the newest 50 first, then the older ones with "load older".
    const alice2 = await openPage(defer, browser, link("alice", "web-2"), "history-alice-2");
    await waitForState(alice2, "online");
    await openConversation(alice2, "bob");
    const older = alice2.locator("#load-older");
    await older.waitFor();
    await alice2.waitForFunction(() => document.querySelectorAll("#messages li").length >= 50);
    await expectConversation(alice2, seenBy("alice", conversation.slice(-50)));
    await screenshot(alice2, "history-alice-2-first-page");
    await older.click();
    await expectConversation(alice2, seenBy("alice", conversation));
    await older.waitFor({ state: "hidden" });
    const helloOnPage2 = ownRow(alice2, "hello bob");
    assert.equal(await helloOnPage2.count(), 1, "alice's own message from history shows as hers");

    // A message alice sends on page 1 shows on page 2 as her own, and gets its ticks there too.
    await say(alice, "from page one");
    conversation.push(["alice", "from page one"]);
    await expectConversation(alice2, seenBy("alice", conversation));
    await expectConversation(bob, seenBy("bob", conversation));
    await alice2.locator('#messages li.own[data-receipt="read"]', { hasText: "from page one" }).waitFor();
    assert.equal(await alice2.locator("#messages li.own").filter({ hasText: "from page one" }).locator(".from").textContent(), "You");
    await alice2.locator("#messages").evaluate((list) => (list.scrollTop = list.scrollHeight));
    await screenshot(alice2, "history-alice-2-copy");

    // A recipient with no device online: one tick, stored, and it stays so.
    server.token("carol", "phone");
    await openConversation(alice, "carol");
    await say(alice, "are you there?");
    const lonely = ownRow(alice, "are you there?");
    await alice.locator('#messages li[data-status="sent"]', { hasText: "are you there?" }).waitFor();
    assert.equal(await lonely.getAttribute("data-receipt"), "sent");
    assert.equal(await lonely.locator(".status").textContent(), "✓");
    await openConversation(alice, "bob"); // for its screenshot
    for (const page of [alice, bob, alice2]) assert.deepEqual(page.errors, [], `${page.name}: uncaught errors`);
  });

  test("a second tab signed in as the same device takes over; the first says so and can take it back", async (t) => {
    const defer = cleanups(t);
    const { server } = await serve(defer);
    const browser = await launch(defer);
    const link = `${server.pageUrl}#token=${server.token("bob", "web-shared")}`;
    const first = await openPage(defer, browser, link, "replaced-first");
    await waitForState(first, "online");
    const second = await openPage(defer, browser, link, "replaced-second");
    await waitForState(second, "online");
    await waitForState(first, "closed");
    await first.locator("#state", { hasText: "replaced by another tab" }).waitFor();
    // Closed for good: the first tab does not reconnect and push the second one out again.
    assert.equal(await second.getAttribute("#state", "data-state"), "online");
    await first.click("#reconnect");
    await waitForState(first, "online");
    await waitForState(second, "closed");
    for (const page of [first, second]) assert.deepEqual(page.errors, [], `${page.name}: uncaught errors`);
  });

  test("over wss:// with the server's CA in Chromium's NSS database", async (t) => {
    const certutil = "/usr/bin/certutil";
    if (!process.env.CI && !existsSync(certutil)) {
      t.skip("certutil not found: apt-get install libnss3-tools");
      return;
    }
    requireTool(certutil, "apt-get install libnss3-tools");
    const defer = cleanups(t);
    const holder = await serve(defer, { env: { DEVASTATOR_WS_TLS: "true" } });
    const { server } = holder;
    assert.match(server.pageUrl, /^https:/);

    // What a user does to trust a private CA in Chromium on Linux: add it to ~/.pki/nssdb.
    const home = mkdtempSync(join(tmpdir(), "devastator-chromium-"));
    defer(() => rmSync(home, { recursive: true, force: true }));
    const nssdb = join(home, ".pki", "nssdb");
    mkdirSync(nssdb, { recursive: true });
    execFileSync(certutil, ["-d", `sql:${nssdb}`, "-N", "--empty-password"]);
    execFileSync(certutil, ["-d", `sql:${nssdb}`, "-A", "-t", "C,,", "-n", "devastator", "-i", server.ca]);
    const browser = await launch(defer, home);

    const alice = await openPage(defer, browser, `${server.pageUrl}#token=${server.token("alice", "web-tls")}`, "alice-wss");
    const bob = await openPage(defer, browser, `${server.pageUrl}#token=${server.token("bob", "web-tls")}`, "bob-wss");
    // An https page may only open wss://: online means the WebSocket is TLS, trusted through the CA.
    await Promise.all([waitForState(alice, "online"), waitForState(bob, "online")]);
    assert.equal(await alice.evaluate(() => location.protocol), "https:");
    await openConversation(alice, "bob");
    await say(alice, "over TLS");
    await openConversation(bob, "alice");
    await expectBoth(alice, bob, [["alice", "over TLS"]]);
    for (const page of [alice, bob]) assert.deepEqual(page.errors, [], `${page.name}: uncaught errors`);
  });
});
