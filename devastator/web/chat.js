// The chat page: signs in with the token from the URL fragment, keeps the
// conversations of this tab's device, and sends and receives through the
// JavaScript client (the same file as the npm package, served by the server):
// delivered and read ticks (receipts), "typing..." (signals), a conversation's
// history from the server, and the user's own messages sent from other devices.
//
// Message text is never parsed as HTML: every node is built with textContent.

const TOKEN_KEY = "devastator.token";
const USER_ID = /^[A-Za-z0-9._@-]{1,64}$/;
const MAX_STORED = 1000; // messages kept in this tab's sessionStorage, oldest dropped first
const MAX_EARLY_RECEIPTS = 1000; // receipts kept for messages this tab has not shown (yet)
const HISTORY_PAGE = 50;
const TYPING_EVERY_MS = 2000; // a typing signal at most this often while the user types
const TYPING_SHOWN_MS = 4000; // "typing..." goes after this long without a typing signal
const READ_DELAY_MS = 150; // reads are sent in one msg.read after this pause (a backlog is one call)
const MAX_READ_BATCH = 500; // ids in one msg.read (the server's limit is 1000 by default)

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
 * Entries: {seq, id?, cid?, from, to, peer, message, ts?, status, error?,
 * delivered?, read?, readSent?}; status is "queued" | "sending" | "sent" |
 * "failed" for the own ones and "received" for the others (a copy from another
 * own device, or an own message from history, is "sent"). delivered and read
 * list the recipients whose receipts came; readSent: this tab told the server
 * it was read.
 */
class ChatStore {
  constructor(key) {
    this.key = key;
    this.entries = [];
    this.peers = new Map(); // peer -> {peer, unread, last}
    this.selected = null;
    this.byId = new Map();
    // Receipts for message ids not shown yet (e.g. the send's answer has not come), oldest first.
    this.early = new Map(); // message id -> {delivered: [users], read: [users]}
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
      for (const [id, receipts] of saved.early || []) this.early.set(id, receipts);
      this.selected = this.peers.has(saved.selected) ? saved.selected : null;
    }
  }

  /** Note that `by` sent a receipt of `type` for message `id`; true if the entry is shown. */
  receipt(id, type, by) {
    const entry = this.byId.get(id);
    const target = entry || this.early.get(id) || { delivered: [], read: [] };
    const list = (target[type === "read" ? "read" : "delivered"] ??= []);
    if (!list.includes(by)) list.push(by);
    if (entry) return true;
    this.early.delete(id); // kept newest last
    this.early.set(id, target);
    if (this.early.size > MAX_EARLY_RECEIPTS) this.early.delete(this.early.keys().next().value);
    return false;
  }

  /** The entry has its id now: the receipts that came before it apply. */
  adopt(entry) {
    this.byId.set(entry.id, entry);
    const early = this.early.get(entry.id);
    if (!early) return;
    this.early.delete(entry.id);
    for (const type of ["delivered", "read"]) {
      const list = (entry[type] ??= []);
      for (const by of early[type] || []) if (!list.includes(by)) list.push(by);
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
        early: [...this.early],
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
  sent: "✓",
  failed: "failed",
  received: "",
};

// The ticks of a stored own message, by how far it got with all its recipients.
const TICKS = {
  sent: ["✓", "sent: stored by the server"],
  delivered: ["✓✓", "delivered"],
  read: ["✓✓ read", "read"],
};

/** "sent", "delivered" or "read": what every recipient (but oneself) of an own message has done. */
function receiptLevel(entry, me) {
  const recipients = (Array.isArray(entry.to) ? entry.to : [entry.to]).filter((user) => user !== me);
  if (!recipients.length) return "sent";
  const read = entry.read || [];
  if (recipients.every((user) => read.includes(user))) return "read";
  const delivered = entry.delivered || [];
  return recipients.every((user) => read.includes(user) || delivered.includes(user)) ? "delivered" : "sent";
}

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
    this.histories = new Map(); // peer -> {loaded, loading, more, before, note}
    this.typing = new Map(); // peer -> the timer that hides its "typing..."
    this.typingSentAt = -Infinity; // when this tab last said the user is typing
    this.typingTo = null; // the peer told the user is typing, until a message or an empty composer
    this.readTimer = null;
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
    $("text").addEventListener("input", () => {
      this.updateComposer();
      this.typed();
    });
    $("reconnect").addEventListener("click", () => this.start());
    $("load-older").addEventListener("click", () => this.loadHistory(this.store.selected, { older: true }));
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && this.store.selected) this.readConversation(this.store.selected);
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
    if (this.store.selected) {
      this.loadHistory(this.store.selected);
      this.readConversation(this.store.selected); // reads a closed tab had not sent yet
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
    this.typingTo = null; // the message itself ends the peer's "typing..."
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
    this.client.send(entry.to, entry.message, { cid: entry.cid, receipt: true }).then(
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
      // A message to oneself can come back as msg.recv before the answer, or history can bring it: keep one.
      this.store.remove(entry);
      entry.element?.remove();
      copy.status = "sent";
      copy.cid = entry.cid;
      this.store.save();
      this.refresh(copy.peer);
      return;
    }
    entry.id = id;
    entry.ts = ts;
    entry.error = null;
    this.store.adopt(entry);
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

  /** A msg.recv: from the peer, or (from === me) a copy of what this user sent from another device. */
  onMessage(msg) {
    const own = msg.from === this.me.user;
    if (!own) this.stopTyping(msg.from);
    if (this.store.byId.has(msg.id)) return; // sent again (at least once), or our own send's answer came first
    const entry = this.merge(msg, own ? (Array.isArray(msg.to) ? msg.to[0] : msg.to) : msg.from);
    const record = this.store.peers.get(entry.peer);
    if (!own && (entry.peer !== this.store.selected || document.hidden)) record.unread += 1;
    this.store.save();
    this.renderConversations();
    this.refresh(entry.peer);
    if (!own && entry.peer === this.store.selected) this.readConversation(entry.peer);
  }

  /** A message from the server (live, a copy, or history) into the conversation with peer; the entry. */
  merge(msg, peer) {
    const known = this.store.byId.get(msg.id);
    if (known) return known;
    const own = msg.from === this.me.user;
    const entry = this.store.add({
      id: msg.id,
      from: msg.from,
      to: msg.to,
      peer,
      message: msg.message,
      ts: msg.ts,
      status: own ? "sent" : "received",
    });
    this.store.adopt(entry);
    return entry;
  }

  // -- receipts: the ticks of own messages, and the reads this tab reports

  onReceipt({ type, message, by }) {
    if (typeof message !== "string" || typeof by !== "string") return;
    const shown = this.store.receipt(message, type, by);
    this.store.save();
    if (shown) this.refresh(this.store.byId.get(message).peer);
  }

  /**
   * The conversation is on screen: no longer unread, and (soon, in one msg.read)
   * its messages are reported read, so that their senders see it.
   */
  readConversation(peer) {
    const record = this.store.peers.get(peer);
    if (record && record.unread && document.visibilityState === "visible") {
      record.unread = 0;
      this.store.save();
      this.renderConversations();
    }
    if (this.readTimer === null) this.readTimer = setTimeout(() => this.sendReads(), READ_DELAY_MS);
  }

  sendReads() {
    this.readTimer = null;
    const peer = this.store.selected;
    if (!peer || document.visibilityState !== "visible") return;
    const unread = this.store
      .conversation(peer)
      .filter((entry) => entry.status === "received" && entry.id && !entry.readSent);
    for (let start = 0; start < unread.length; start += MAX_READ_BATCH) {
      const batch = unread.slice(start, start + MAX_READ_BATCH);
      for (const entry of batch) entry.readSent = true;
      this.client.markRead(batch.map((entry) => entry.id)).catch((error) => {
        for (const entry of batch) entry.readSent = false; // told again the next time it is on screen
        console.warn("could not report messages read:", error);
      });
    }
    if (unread.length) this.store.save();
  }

  // -- typing: signals both ways

  onSignal({ from, signal }) {
    if (from === this.me.user || !signal || typeof signal !== "object") return; // another own tab, or not ours
    if (signal.typing === true) {
      clearTimeout(this.typing.get(from));
      this.typing.set(from, setTimeout(() => this.stopTyping(from), TYPING_SHOWN_MS));
      this.renderTyping();
    } else if (signal.typing === false) {
      this.stopTyping(from);
    }
  }

  stopTyping(peer) {
    if (!this.typing.has(peer)) return;
    clearTimeout(this.typing.get(peer));
    this.typing.delete(peer);
    this.renderTyping();
  }

  renderTyping() {
    const peer = this.store.selected;
    const element = $("typing");
    element.hidden = !(peer && this.typing.has(peer));
    element.textContent = element.hidden ? "" : `${peer} is typing...`;
  }

  /** The user typed in the composer: tell the peer, at most every TYPING_EVERY_MS. */
  typed() {
    const peer = this.store.selected;
    if (!peer || peer === this.me.user || this.client.state !== "open") return;
    if (!$("text").value.trim()) {
      if (this.typingTo === peer) this.signal(peer, { typing: false }); // cleared: no longer typing
      this.typingTo = null;
      return;
    }
    const now = Date.now();
    if (now - this.typingSentAt < TYPING_EVERY_MS) return;
    this.typingSentAt = now;
    this.typingTo = peer;
    this.signal(peer, { typing: true });
  }

  signal(peer, data) {
    // Ephemeral: a signal lost to a drop or a rate limit is not worth a retry.
    this.client.signal(peer, data).catch((error) => console.debug("typing signal not sent:", error));
  }

  // -- history: the conversation as the server keeps it

  /** Load the newest page of the conversation once, or (older) the page before the oldest loaded. */
  loadHistory(peer, { older = false } = {}) {
    if (!peer) return;
    const state = this.histories.get(peer) || { loaded: false, loading: false, more: false, before: null, note: "" };
    this.histories.set(peer, state);
    if (state.loading || (older ? !state.more : state.loaded)) return;
    state.loading = true;
    state.note = "";
    this.renderHistoryBar();
    this.client.history(peer, { limit: HISTORY_PAGE, before: older ? state.before : undefined }).then(
      ({ messages, more }) => {
        state.loaded = true;
        state.more = Boolean(more) && messages.length > 0;
        if (messages.length) state.before = messages.at(-1).id; // newest first: the last is the oldest
        const list = this.list;
        const keep = older && this.store.selected === peer ? list.scrollHeight - list.scrollTop : null;
        for (const msg of messages) this.merge(msg, peer);
        this.store.save();
        this.renderConversations();
        this.refresh(peer);
        if (keep !== null) list.scrollTop = list.scrollHeight - keep; // the older page grows above what was on screen
        if (peer === this.store.selected) this.readConversation(peer);
      },
      (error) => {
        if (error?.code === -32601) {
          state.loaded = true; // history is off on this server
        } else if (error?.code === -32005) {
          state.loaded = true;
          state.note = "No such user.";
        } else {
          state.note = `Could not load the history: ${describeError(error)}`;
        }
      },
    ).finally(() => {
      state.loading = false;
      this.renderHistoryBar();
    });
  }

  renderHistoryBar() {
    const state = this.histories.get(this.store.selected);
    const button = $("load-older");
    button.hidden = !state || !state.more || state.loading;
    const note = $("history-note");
    note.textContent = state?.loading ? "Loading the history…" : state?.note || "";
    note.hidden = !note.textContent;
    $("history-bar").hidden = button.hidden && note.hidden;
  }

  // -- the conversation list

  select(peer) {
    this.store.selected = peer;
    this.store.touch(peer);
    this.readConversation(peer);
    this.store.save();
    this.renderConversations();
    this.renderMessages();
    this.scrollToEnd();
    this.loadHistory(peer);
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
    this.renderTyping();
    this.renderHistoryBar();
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
    const status = item.querySelector(".status");
    if (entry.from === this.me.user && entry.status === "sent") {
      const level = receiptLevel(entry, this.me.user);
      const [ticks, title] = TICKS[level];
      item.dataset.receipt = level;
      status.textContent = ticks;
      const by = level === "read" ? entry.read || [] : [...new Set([...(entry.delivered || []), ...(entry.read || [])])];
      status.title = level === "sent" ? title : `${title}: ${by.join(", ")}`;
    } else {
      delete item.dataset.receipt;
      status.textContent = STATUS_TEXT[entry.status] ?? entry.status;
      status.removeAttribute("title");
    }
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
  client.on("receipt", (receipt) => page.onReceipt(receipt));
  client.on("signal", (signal) => page.onSignal(signal));
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
