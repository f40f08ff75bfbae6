// Type-checked by `tsc -p tsconfig.json` (npm test), never run: right uses compile,
// and each @ts-expect-error line must fail to compile, or tsc reports it unused.
import { CloseCode, ConnectionError, DevastatorClient, ErrorCode, RpcError } from "devastator-client";
import type { AuthResult, CloseInfo, HistoryPage, Message, Receipt, SendResult, Signal, State, WebSocketLike } from "devastator-client";

class FakeWebSocket implements WebSocketLike {
  readyState = 0;
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: string }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;
  constructor(readonly url: string) {}
  send(_data: string): void {}
  close(_code?: number, _reason?: string): void {}
}

export async function usage(): Promise<void> {
  const browser = new DevastatorClient("wss://example.org/ws", { token: "jwt" }); // the DOM's WebSocket fits
  const client = new DevastatorClient("ws://localhost:3000/ws", {
    getToken: async () => "jwt",
    WebSocket: FakeWebSocket,
    reconnect: { minDelayMs: 100, maxDelayMs: 5000 },
    maxQueued: 10,
    dedupeSize: 100,
  });
  new DevastatorClient("ws://localhost:3000/ws", { token: "jwt", WebSocket: globalThis.WebSocket, reconnect: false });

  const unsubscribe: () => void = client.on("open", ({ user, device, pending }: AuthResult) => {
    console.log(user.toUpperCase(), device.length, pending + 1);
  });
  unsubscribe();
  client.on("message", async (message: Message) => {
    const from: string = message.from;
    const ts: number = message.ts;
    console.log(from, ts, message.id, message.to, message.message, message.expires);
  });
  client.on("message", (message) => void message.id);
  client.on("message", (message) => {
    if (message.from === client.user) console.log("sent from another device to", message.to);
  });
  client.on("receipt", async ({ id, type, message, by, ts }: Receipt) => {
    const read: boolean = type === "read";
    console.log(id.length, read, message.length, by.length, ts + 1);
  });
  client.on("signal", (signal: Signal) => console.log(signal.from, signal.to, signal.signal, signal.ts));
  client.on("signal", ({ signal }) => void signal);
  client.on("close", ({ code, reason, willReconnect }: CloseInfo) => console.log(code === CloseCode.REPLACED, reason, willReconnect));
  client.on("error", (error: Error) => console.log(error.message));

  const auth: AuthResult = await client.connect();
  const sent: SendResult = await client.send("bob", { text: "hi" }, { cid: "c-1", ttl: 60, receipt: true });
  const acked: "ACK" = await client.markRead([sent.id]);
  const signalled: "ACK" = await client.signal(["bob"], { typing: true });
  await client.signal("bob", null);
  const page: HistoryPage = await client.history("bob", { limit: 50 });
  const older = await client.history("bob", { before: page.messages.at(-1)?.id ?? null });
  await client.history("bob");
  const first: Message | undefined = older.messages[0];
  const me: string | null = client.user;
  const device: string | null = client.device;
  console.log(acked, signalled, page.more, first?.from, me, device);
  await client.send(["bob", "carol"], null);
  const id: string = sent.id;
  const ts: number = sent.ts;
  const pong: "pong" = await client.ping();
  const history = await client.call<{ more: boolean }>("msg.history", { with: "bob" });
  const more: boolean = history.more;
  const state: State = client.state;
  client.close();
  browser.close();
  console.log(auth, id, ts, pong, more, state);

  try {
    await client.send("bad id!", 1);
  } catch (error) {
    if (error instanceof RpcError) {
      const code: number = error.code;
      const data: unknown = error.data;
      console.log(code === ErrorCode.INVALID_PARAMS, data, error.message);
    } else if (error instanceof ConnectionError) {
      console.log(error.code, error.reason);
    }
  }
  const forbidden: -32002 = ErrorCode.FORBIDDEN;
  console.log(forbidden, new RpcError(-32602, "bad", { field: "to" }) instanceof Error);

  // @ts-expect-error a token or getToken is required
  new DevastatorClient("ws://x/ws", {});
  // @ts-expect-error not both
  new DevastatorClient("ws://x/ws", { token: "a", getToken: () => "b" });
  // @ts-expect-error a token is a string
  new DevastatorClient("ws://x/ws", { token: 42 });
  // @ts-expect-error getToken gives a string
  new DevastatorClient("ws://x/ws", { getToken: async () => 42 });
  // @ts-expect-error reconnect is options or false
  new DevastatorClient("ws://x/ws", { token: "a", reconnect: true });
  // @ts-expect-error not a WebSocket class
  new DevastatorClient("ws://x/ws", { token: "a", WebSocket: class {} });
  // @ts-expect-error no such event
  client.on("opened", () => {});
  // @ts-expect-error a message listener gets a Message
  client.on("message", (message: string) => console.log(message));
  // @ts-expect-error a close listener gets CloseInfo
  client.on("close", (info: AuthResult) => console.log(info));
  // @ts-expect-error state is read-only
  client.state = "open";
  // @ts-expect-error no such state
  const wrong: State = "reconnecting";
  // @ts-expect-error a send result's ts is a number
  const text: string = sent.ts;
  // @ts-expect-error send needs a recipient
  await client.send();
  // @ts-expect-error the cid is a string
  await client.send("bob", 1, { cid: 7 });
  // @ts-expect-error receipt is a boolean
  await client.send("bob", 1, { receipt: "yes" });
  // @ts-expect-error markRead wants an array of ids
  await client.markRead("m1");
  // @ts-expect-error a receipt listener gets a Receipt
  client.on("receipt", (receipt: Message) => console.log(receipt));
  // @ts-expect-error no such receipt type
  client.on("receipt", (receipt) => receipt.type === "seen");
  // @ts-expect-error history needs a user
  await client.history();
  // @ts-expect-error limit is a number
  await client.history("bob", { limit: "50" });
  // @ts-expect-error user is read-only
  client.user = "mallory";
  // @ts-expect-error ErrorCode is read-only
  ErrorCode.FORBIDDEN = 1;
  console.log(wrong, text);
}
