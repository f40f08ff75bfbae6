// Helpers of the real-server tests (real-server*.test.js): cleanups, a server
// per test, clients whose frames are recorded, and waiting on events with a deadline.
import assert from "node:assert/strict";
import WebSocket from "ws";
import { DevastatorClient } from "../index.js";
import { startServer } from "./server.js";

export const WAIT_MS = 10000;
export const QUICK_RECONNECT = { minDelayMs: 50, maxDelayMs: 300 };

/** Cleanups of a test, run last first after it, pass or fail. */
export function cleanups(t) {
  const stack = [];
  t.after(async () => {
    for (const cleanup of stack.reverse()) await cleanup();
  });
  return (cleanup) => stack.push(cleanup);
}

/** A server killed and removed after the test; `holder.server` follows restarts. */
export async function serve(defer, env) {
  const holder = { server: await startServer({ env }) };
  defer(async () => {
    await holder.server.kill();
    holder.server.remove();
  });
  return holder;
}

/** The ws package's WebSocket, recording every frame both ways (parsed). */
export function recordingWebSocket() {
  const frames = { received: [], sent: [] };
  class RecordingWebSocket extends WebSocket {
    constructor(url) {
      super(url);
      this.addEventListener("message", (event) => frames.received.push(JSON.parse(event.data)));
    }

    send(text) {
      frames.sent.push(JSON.parse(text));
      super.send(text);
    }
  }
  return { WebSocket: RecordingWebSocket, frames };
}

/**
 * A client of user/device on holder's server, closed after the test; its frames
 * are recorded, and so are its messages, receipts and signals.
 */
export function newClient(defer, holder, user, device, options = {}) {
  const { WebSocket: Recording, frames } = recordingWebSocket();
  const client = new DevastatorClient(holder.server.url, {
    token: holder.server.token(user, device),
    WebSocket: Recording,
    reconnect: QUICK_RECONNECT,
    ...options,
  });
  const messages = [];
  const receipts = [];
  const signals = [];
  client.on("message", (msg) => messages.push(msg));
  client.on("receipt", (receipt) => receipts.push(receipt));
  client.on("signal", (signal) => signals.push(signal));
  defer(() => client.close());
  return { client, frames, messages, receipts, signals };
}

/** Poll until check() is truthy; fail after the deadline. */
export async function waitFor(check, what, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** The next event of the client, or a failure after the deadline. */
export function nextEvent(client, event, timeoutMs = WAIT_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${event} event within ${timeoutMs} ms`));
    }, timeoutMs);
    const off = client.on(event, (value) => {
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}

/** Every JSON-RPC object of a list of frames, batches opened. */
export function flat(frames) {
  return frames.flatMap((frame) => (Array.isArray(frame) ? frame : [frame]));
}

export function isAck(frame, id) {
  return !Array.isArray(frame) && frame.id === id && frame.result === "ACK";
}

export function acksOf(frames, id) {
  return flat(frames).filter((frame) => isAck(frame, id)).length;
}

/** A fresh connection of user/device: its auth result (how many deliveries still wait). */
export async function pendingOf(defer, holder, user, device) {
  const { client } = newClient(defer, holder, user, device);
  const result = await client.connect();
  client.close();
  return result.pending;
}
