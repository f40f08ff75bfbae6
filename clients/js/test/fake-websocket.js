// A WebSocket double for the state-machine tests: the test plays the server.
// Each fakeWebSocket() is a class of its own that records its sockets, so that
// tests share nothing.

/** A queue whose next() waits for the next item pushed. */
function queue() {
  const items = [];
  const takers = [];
  return {
    push(item) {
      if (takers.length) takers.shift()(item);
      else items.push(item);
    },
    next() {
      return items.length ? Promise.resolve(items.shift()) : new Promise((resolve) => takers.push(resolve));
    },
    get size() {
      return items.length;
    },
  };
}

export function fakeWebSocket() {
  const created = queue();
  const all = [];

  class FakeWebSocket {
    readyState = 0;
    onopen = null;
    onmessage = null;
    onclose = null;
    onerror = null;
    /** Set when the client closed it: { code, reason }. */
    closedByClient = null;
    #frames = queue();

    constructor(url) {
      this.url = url;
      all.push(this);
      created.push(this);
    }

    // --- the client's side
    send(text) {
      if (this.readyState !== 1) throw new Error(`send on a socket in state ${this.readyState}`);
      this.#frames.push(JSON.parse(text));
    }

    close(code, reason = "") {
      if (this.readyState >= 2) return;
      this.readyState = 2;
      this.closedByClient = { code, reason };
      queueMicrotask(() => this.drop(code ?? 1005, reason));
    }

    // --- the server's side
    accept() {
      this.readyState = 1;
      this.onopen?.({});
    }

    /** The next frame the client wrote, parsed. */
    frame() {
      return this.#frames.next();
    }

    /** Frames written and not read by frame() yet. */
    get unread() {
      return this.#frames.size;
    }

    deliver(value) {
      this.receive(JSON.stringify(value));
    }

    receive(text) {
      this.onmessage?.({ data: text });
    }

    drop(code = 1006, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }

    /** Accept, read the auth.jwt request, answer it; returns the request. */
    async authenticate(result = { user: "alice", device: "phone", pending: 0 }) {
      this.accept();
      const request = await this.frame();
      this.deliver({ jsonrpc: "2.0", id: request.id, result });
      return request;
    }
  }

  return {
    WebSocket: FakeWebSocket,
    /** Every socket made so far. */
    all,
    /** The next socket the client makes (those already made first). */
    next: () => created.next(),
  };
}

/** The next value of a client event. */
export function once(client, event) {
  return new Promise((resolve) => {
    const off = client.on(event, (value) => {
      off();
      resolve(value);
    });
  });
}

export function recv(id, message = `text of ${id}`, extra = {}) {
  return {
    jsonrpc: "2.0",
    id,
    method: "msg.recv",
    params: { id, from: "bob", to: "alice", message, ts: 1, expires: 2, ...extra },
  };
}

export function ack(id) {
  return { jsonrpc: "2.0", id, result: "ACK" };
}
