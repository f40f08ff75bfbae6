// The chat page: signs in with the token from the URL fragment, keeps the
// conversations of this tab's device, and sends and receives through the
// JavaScript client (the same file as the npm package, served by the server).
//
// Message text is never parsed as HTML: every node is built with textContent.

const TOKEN_KEY = "devastator.token";
const USER_ID = /^[A-Za-z0-9._@-]{1,64}$/;
const MAX_STORED = 1000; // messages kept in this tab's sessionStorage, oldest dropped first

const $ = (id) => document.getElementById(id);

// -- signing in --------------------------------------------------------------------

/** The token from `#token=...` (then kept for reloads and taken out of the address bar), or the kept one. */
function takeToken() {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    // A fragment is never sent to a server, but it stays in the history and in screenshots.
    history.replaceState(history.state, "", location.pathname + location.search);
    return fromUrl;
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

/** The unverified claims of a JWT: enough to say who this is before the server answers. */
function claimsOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "=")));
  } catch {
    return {};
  }
}

function showSignedOut(reason) {
  $("chat").hidden = true;
  $("whoami").hidden = true;
  $("reconnect").hidden = true;
  $("signed-out").hidden = false;
  const why = $("signed-out-reason");
  why.hidden = !reason;
  why.textContent = reason || "";
  setState(reason ? "closed" : "signed-out", reason ? "Signed out" : "Not signed in");
}

function setState(state, text) {
  const element = $("state");
  element.dataset.state = state;
  $("state-text").textContent = text;
}

// -- the conversations of this device, kept for reloads --------------------------------

/**
 * Every message this tab has shown, in sessionStorage under the user and device.
 * Entries: {seq, id?, cid?, from, to, peer, message, ts?, status, error?};
 * status is "queued" | "sending" | "sent" | "failed" for the own ones and
 * "received" for the others (a copy from another own device is "sent").
 */
class ChatStore {
  constructor(key) {
    this.key = key;
    this.entries = [];
    this.peers = new Map(); // peer -> {peer, unread, last}
    this.selected = null;
    this.byId = new Map();
    this.seq = 0;
    this.saving = false;
    let saved = null;
    try {
      saved = JSON.parse(sessionStorage.getItem(key) || "null");
    } catch {
      saved = null;
    }
    if (saved && saved.v === 1) {
      for (const peer of saved.peers || []) this.peers.set(peer.peer, peer);
      for (const entry of saved.entries || []) this.add(entry);
      this.selected = this.peers.has(saved.selected) ? saved.selected : null;
    }
  }

  add(entry) {
    entry.seq = entry.seq ?? this.seq + 1;
    this.seq = Math.max(this.seq, entry.seq);
    this.entries.push(entry);
    if (entry.id) this.byId.set(entry.id, entry);
    this.touch(entry.peer, entry);
    return entry;
  }

  remove(entry) {
    this.entries = this.entries.filter((other) => other !== entry);
    if (entry.id && this.byId.get(entry.id) === entry) this.byId.delete(entry.id);
  }

  touch(peer, entry) {
    const record = this.peers.get(peer) || { peer, unread: 0, last: 0 };
    if (entry) record.last = Math.max(record.last, entry.ts || Date.now());
    this.peers.set(peer, record);
    return record;
  }

  conversation(peer) {
    return this.entries.filter((entry) => entry.peer === peer).sort(inOrder);
  }

  pending() {
    return this.entries.filter((entry) => entry.status === "queued" || entry.status === "sending");
  }

  /** Written once per task, so a backlog batch of 100 messages is one write. */
  save() {
    if (this.saving) return;
    this.saving = true;
    queueMicrotask(() => {
      this.saving = false;
      const kept = this.entries.sort(inOrder).slice(-MAX_STORED);
      const state = {
        v: 1,
        selected: this.selected,
        peers: [...this.peers.values()],
        entries: kept.map(({ element, ...entry }) => entry),
      };
      try {
        sessionStorage.setItem(this.key, JSON.stringify(state));
      } catch (error) {
        console.warn("could not keep the conversations for a reload:", error);
      }
    });
  }
}

/** Stored messages by the server's acceptance order (ts, then id); the unsent after them, as written. */
function inOrder(a, b) {
  const aPending = a.ts == null;
  const bPending = b.ts == null;
  if (aPending !== bPending) return aPending ? 1 : -1;
  if (aPending) return a.seq - b.seq;
  return a.ts - b.ts || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
}

function newCid() {
  // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "web-" + Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

// -- rendering ----------------------------------------------------------------------

function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value == null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) if (child != null) element.append(child);
  return element;
}

/** The text of a `{"text": ...}` message; null for any other JSON value. */
function textOf(message) {
  return message && typeof message === "object" && !Array.isArray(message) && typeof message.text === "string"
    ? message.text
    : null;
}

function formatTime(ts) {
  const date = new Date(ts);
  const today = new Date().toDateString() === date.toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

const STATUS_TEXT = {
  queued: "queued: sends when back online",
  sending: "sending…",
  sent: "sent",
  failed: "failed",
  received: "",
};

const ERROR_TEXT = {
  "-32001": "not signed in",
  "-32002": "not allowed",
  "-32003": "the server is busy: try again later",
  "-32004": "too large",
  "-32005": "no such user",
  "-32602": "refused by the server",
};

// Answers after which the same send may succeed: overloaded, or an internal error.
const RETRYABLE = new Set([-32003, -32603]);

function describeError(error) {
  const known = error && error.code != null ? ERROR_TEXT[String(error.code)] : null;
  const detail = (error && error.message) || String(error);
  return known && detail && detail !== known ? `${known} (${detail})` : known || detail;
}

class ChatPage {
  constructor(store, me, client) {
    this.store = store;
    this.me = me;
    this.client = client;
    this.list = $("messages");
    this.atEnd = true; // the list follows new messages while it is scrolled to its end
    this.bind();
  }

  bind() {
    $("new-conversation").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("peer");
      const peer = input.value.trim();
      if (!USER_ID.test(peer)) {
        input.setCustomValidity("A user id is 1 to 64 letters, digits or . _ @ -");
        input.reportValidity();
        return;
      }
      input.value = "";
      this.store.touch(peer);
      this.select(peer);
      $("text").focus();
    });
    $("peer").addEventListener("input", (event) => event.target.setCustomValidity(""));
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.sendText();
    });
    $("text").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.sendText();
      }
    });
    $("text").addEventListener("input", () => this.updateComposer());
    $("reconnect").addEventListener("click", () => this.start());
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.store.selected) this.markRead(this.store.selected);
    });
    this.list.addEventListener("scroll", () => {
      this.atEnd = this.isAtEnd();
    });
    // A narrower window or a growing composer must not hide the newest message.
    new ResizeObserver(() => this.atEnd && this.scrollToEnd()).observe(this.list);
  }

  /**
   * Connect, and send what is not stored yet: the sends a reload interrupted,
   * and those a final close turned down. Their cid is the same, so the server
   * stores each once even if an earlier try got through.
   */
  start() {
    $("reconnect").hidden = true;
    setState("connecting", "Connecting…");
    this.client.connect().catch(() => {}); // the close event says why
    for (const entry of this.store.entries) {
      if (entry.status === "queued" || entry.status === "sending" || (entry.status === "failed" && entry.unsent)) {
        this.retry(entry);
      }
    }
  }

  show() {
    $("signed-out").hidden = true;
    $("chat").hidden = false;
    this.showIdentity(this.me);
    this.renderConversations();
    this.renderMessages();
  }

  showIdentity({ user, device }) {
    this.me = { user, device };
    $("user").textContent = user || "?";
    $("device").textContent = device || "?";
    $("whoami").hidden = false;
    document.title = `${user} · Devastator`;
  }

  // -- connection state, from the client's events

  onOpen({ user, device }) {
    this.showIdentity({ user, device });
    setState("online", "Online");
    for (const entry of this.store.pending()) this.setStatus(entry, "sending");
  }

  onClose({ code, reason, willReconnect }) {
    if (willReconnect) {
      for (const entry of this.store.pending()) this.setStatus(entry, "queued");
      setState("reconnecting", navigator.onLine === false ? "Offline: no network, waiting for it" : "Offline: reconnecting…");
      return;
    }
    const why = closeReason(code, reason);
    setState("closed", `Closed: ${why}`);
    if (code === 4001) $("reconnect").hidden = false; // take the device back from the other tab
  }

  // -- sending

  sendText() {
    const input = $("text");
    const text = input.value;
    const peer = this.store.selected;
    if (!peer || !text.trim()) return;
    input.value = "";
    input.focus(); // a click on Send would leave the focus on a disabled button
    this.updateComposer();
    this.send(peer, { text });
    this.scrollToEnd();
  }

  send(peer, message) {
    const entry = this.store.add({
      cid: newCid(),
      from: this.me.user,
      to: peer,
      peer,
      message,
      ts: null,
      status: this.client.state === "open" ? "sending" : "queued",
    });
    this.store.save();
    this.renderConversations();
    this.refresh(peer);
    this.dispatch(entry);
    return entry;
  }

  dispatch(entry) {
    this.client.send(entry.to, entry.message, { cid: entry.cid }).then(
      ({ id, ts }) => this.stored(entry, id, ts),
      (error) => {
        // An RpcError is the server's answer; anything else (the client closed) means not sent yet.
        const answer = error && typeof error.code === "number" && error.code < 0 ? error.code : null;
        entry.unsent = answer === null;
        entry.retryable = entry.unsent || RETRYABLE.has(answer);
        entry.error = entry.unsent ? `not sent: ${error.message || error}` : describeError(error);
        this.setStatus(entry, "failed");
      },
    );
  }

  retry(entry) {
    entry.error = null;
    entry.unsent = false;
    this.setStatus(entry, this.client.state === "open" ? "sending" : "queued");
    this.dispatch(entry); // the same cid: stored once even if the first try was
  }

  /** The server stored it: it has its id and ts now. */
  stored(entry, id, ts) {
    if (entry.status === "sent") return; // answered twice (sent again by a new client)
    const copy = this.store.byId.get(id);
    if (copy && copy !== entry) {
      // A message to oneself can come back as msg.recv before the answer: keep one.
      this.store.remove(entry);
      copy.status = "sent";
      this.refresh(copy.peer);
      return;
    }
    entry.id = id;
    entry.ts = ts;
    entry.error = null;
    this.store.byId.set(id, entry);
    this.store.touch(entry.peer, entry);
    this.setStatus(entry, "sent");
    this.renderConversations();
  }

  setStatus(entry, status) {
    if (entry.status === status) return;
    entry.status = status;
    this.store.save();
    this.refresh(entry.peer);
  }

  // -- receiving

  onMessage(msg) {
    if (this.store.byId.has(msg.id)) return; // sent again (at least once), or our own send's answer came first
    const own = msg.from === this.me.user;
    const peer = own ? (Array.isArray(msg.to) ? msg.to[0] : msg.to) : msg.from;
    this.store.add({
      id: msg.id,
      from: msg.from,
      to: msg.to,
      peer,
      message: msg.message,
      ts: msg.ts,
      status: own ? "sent" : "received",
    });
    const record = this.store.peers.get(peer);
    if (!own && (peer !== this.store.selected || document.hidden)) record.unread += 1;
    this.store.save();
    this.renderConversations();
    this.refresh(peer);
  }

  markRead(peer) {
    const record = this.store.peers.get(peer);
    if (record && record.unread) {
      record.unread = 0;
      this.store.save();
      this.renderConversations();
    }
  }

  // -- the conversation list

  select(peer) {
    this.store.selected = peer;
    this.store.touch(peer);
    this.markRead(peer);
    this.store.save();
    this.renderConversations();
    this.renderMessages();
    this.scrollToEnd();
  }

  renderConversations() {
    const list = $("conversations");
    const peers = [...this.store.peers.values()].sort((a, b) => b.last - a.last || a.peer.localeCompare(b.peer));
    const items = peers.map(({ peer, unread }) => {
      const last = this.store.conversation(peer).at(-1);
      const preview = last ? previewOf(last) : "no messages yet";
      const button = h(
        "button",
        {
          type: "button",
          class: "conversation-button",
          "data-peer": peer,
          "aria-current": peer === this.store.selected ? "true" : null,
        },
        h("span", { class: "peer", text: peer }),
        h("span", { class: "preview", text: preview }),
        unread ? h("span", { class: "unread", text: String(unread), "aria-label": `${unread} unread` }) : null,
      );
      button.addEventListener("click", () => this.select(peer));
      return h("li", {}, button);
    });
    const focused = document.activeElement?.dataset?.peer;
    list.replaceChildren(...items);
    if (focused) list.querySelector(`[data-peer="${CSS.escape(focused)}"]`)?.focus();
    $("no-conversations").hidden = peers.length > 0;
    const unread = peers.reduce((sum, record) => sum + record.unread, 0);
    document.title = `${unread ? `(${unread}) ` : ""}${this.me.user || "Devastator"} · Devastator`;
  }

  // -- the messages of the selected conversation

  renderMessages() {
    const peer = this.store.selected;
    $("conversation-title").textContent = peer ? `Conversation with ${peer}` : "Pick a conversation";
    this.list.setAttribute("aria-busy", "true"); // a switch is not news for a screen reader
    this.list.replaceChildren();
    if (peer) this.refresh(peer);
    this.list.removeAttribute("aria-busy");
    this.updateComposer();
  }

  /** Bring the selected conversation's list up to date, moving only what changed place. */
  refresh(peer) {
    if (peer !== this.store.selected) return;
    const atEnd = this.atEnd;
    const entries = this.store.conversation(peer);
    const wanted = new Set();
    entries.forEach((entry, index) => {
      const element = this.element(entry);
      wanted.add(element);
      if (this.list.children[index] !== element) this.list.insertBefore(element, this.list.children[index] || null);
    });
    for (const element of [...this.list.children]) if (!wanted.has(element)) element.remove();
    if (atEnd) this.scrollToEnd();
  }

  /** The entry's <li>, made once and updated in place. */
  element(entry) {
    let item = entry.element;
    if (!item) {
      const own = entry.from === this.me.user;
      const text = textOf(entry.message);
      const body =
        text != null
          ? h("p", { class: "text", text })
          : h("pre", { class: "text json" }, h("code", { text: JSON.stringify(entry.message) }));
      item = h(
        "li",
        { class: own ? "message own" : "message" },
        h("span", { class: "from", text: own ? "You" : entry.from }),
        body,
        h("p", { class: "meta" }, h("time"), h("span", { class: "status" }), h("span", { class: "error" })),
      );
      if (Array.isArray(entry.to)) {
        item.insertBefore(h("span", { class: "to", text: `to ${entry.to.join(", ")}` }), body);
      }
      const retry = h("button", { type: "button", class: "retry", text: "Retry" });
      retry.addEventListener("click", () => this.retry(entry));
      item.querySelector(".meta").append(retry);
      entry.element = item;
    }
    item.dataset.status = entry.status;
    if (entry.id) item.dataset.id = entry.id;
    if (entry.cid) item.dataset.cid = entry.cid;
    const time = item.querySelector("time");
    if (entry.ts != null) {
      time.dateTime = new Date(entry.ts).toISOString();
      time.textContent = formatTime(entry.ts);
      time.title = new Date(entry.ts).toLocaleString();
    }
    item.querySelector(".status").textContent = STATUS_TEXT[entry.status] ?? entry.status;
    item.querySelector(".error").textContent = entry.status === "failed" && entry.error ? entry.error : "";
    item.querySelector(".retry").hidden = !(entry.status === "failed" && entry.retryable);
    return item;
  }

  updateComposer() {
    const input = $("text");
    input.disabled = !this.store.selected;
    $("send").disabled = !this.store.selected || !input.value.trim();
    // Grow with the text, up to the CSS max-height.
    input.style.height = "auto";
    input.style.height = `${input.scrollHeight}px`;
  }

  isAtEnd() {
    const list = this.list;
    return list.scrollHeight - list.scrollTop - list.clientHeight < 48;
  }

  scrollToEnd() {
    this.list.scrollTop = this.list.scrollHeight;
    this.atEnd = true;
  }
}

function previewOf(entry) {
  const text = textOf(entry.message);
  const shown = text != null ? text : JSON.stringify(entry.message);
  return (entry.from !== entry.peer ? "You: " : "") + shown.slice(0, 80);
}

const CLOSE_REASONS = {
  4001: "replaced by another tab", // the same device signed in elsewhere
  4002: "this device was removed: get a new link with bin/devastator open USER",
  1008: "a message was too large",
};

function closeReason(code, reason) {
  return CLOSE_REASONS[code] || reason || (code ? `connection closed (code ${code})` : "connection closed");
}

// -- start ------------------------------------------------------------------------------

async function main() {
  window.addEventListener("hashchange", () => {
    // A new sign-in link pasted into this tab: a hash change does not load the page by itself.
    if (new URLSearchParams(location.hash.slice(1)).get("token")) {
      takeToken();
      location.reload();
    }
  });
  const token = takeToken();
  if (!token) {
    showSignedOut(null);
    return;
  }
  const claims = claimsOf(token);
  if (claims.exp && claims.exp * 1000 < Date.now()) {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignedOut("This sign-in link has expired.");
    return;
  }
  let library;
  try {
    library = await import("/client/devastator-client.js");
  } catch (error) {
    setState("closed", "Could not load the client (/client/devastator-client.js)");
    console.error(error);
    return;
  }
  const { DevastatorClient, RpcError } = library;
  const me = { user: claims.sub, device: claims.dev };
  const store = new ChatStore(`devastator.chat.${me.user}.${me.device}`);
  const client = new DevastatorClient(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`, {
    getToken: () => sessionStorage.getItem(TOKEN_KEY) || token,
    reconnect: { minDelayMs: 500, maxDelayMs: 20000 },
  });
  const page = new ChatPage(store, me, client);
  let refused = null; // the server turned the token down: reconnecting cannot help

  client.on("open", (result) => {
    refused = null;
    page.onOpen(result);
  });
  client.on("message", (msg) => page.onMessage(msg));
  client.on("error", (error) => {
    if (error instanceof RpcError && (error.code === -32002 || error.code === -32001)) refused = error;
    else console.warn("devastator client:", error);
  });
  client.on("close", (event) => {
    if (!event.willReconnect && (refused || event.code === 4002)) {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignedOut(
        refused ? `The server refused this sign-in link: ${refused.message}.` : "This device was removed from the server.",
      );
      return;
    }
    page.onClose(event);
  });
  window.addEventListener("online", () => {
    if ($("state").dataset.state === "reconnecting") setState("reconnecting", "Offline: reconnecting…");
  });
  page.show();
  page.start();
}

main();
