// Types of the Devastator client (index.js). Written by hand: keep in step with index.js.

export type State = "idle" | "connecting" | "open" | "closed";

/** The answer to auth.jwt: who this connection is, and how many messages wait for it. */
export interface AuthResult {
  user: string;
  device: string;
  pending: number;
}

/**
 * The params of a msg.recv delivery. `from === client.user` means a copy: a message
 * this user sent from another of its devices, `to` being its recipient(s) as sent.
 */
export interface Message<T = unknown> {
  id: string;
  from: string;
  /** The recipient (this user), or the recipient(s) as sent, for a copy sent from another device. */
  to: string | string[];
  message: T;
  /** Milliseconds since the Unix epoch. */
  ts: number;
  expires: number;
}

/** The params of a msg.receipt delivery: a message this user sent with `receipt: true` reached `by`. */
export interface Receipt {
  /** The receipt's own id (`<message id>.<d|r>.<by>`), once per recipient and type. */
  id: string;
  type: "delivered" | "read";
  /** The id of the message it is about. */
  message: string;
  /** The recipient whose device took it ("delivered") or who read it ("read"). */
  by: string;
  ts: number;
}

/** The params of a msg.signal notification: ephemeral state such as `{typing: true}`. */
export interface Signal<T = unknown> {
  from: string;
  /** This user. */
  to: string;
  signal: T;
  ts: number;
}

export interface HistoryOptions {
  /** A message id: the page holds messages older than it. */
  before?: string | null;
  /** 1 to 100; the server's default is 50. */
  limit?: number;
}

/** A page of a conversation, newest first; `more`: older messages are left. */
export interface HistoryPage {
  messages: Message[];
  more: boolean;
}

export interface CloseInfo {
  code: number;
  reason: string;
  willReconnect: boolean;
}

export interface SendOptions {
  /** Client id of the message: a retry with the same cid is stored once. Made if absent. */
  cid?: string;
  /** Seconds the message waits for its recipients. */
  ttl?: number;
  /** Ask for "delivered" and "read" receipts (the "receipt" event). */
  receipt?: boolean;
}

export interface SendResult {
  id: string;
  ts: number;
}

/**
 * What the client needs of a WebSocket: the browser's, the ws package's, or a fake.
 * The client sets the on* handlers; it reads event.data (a string) of a message
 * event and event.code and event.reason of a close event.
 */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
}

export interface WebSocketConstructor {
  new (url: string): WebSocketLike;
}

export interface ReconnectOptions {
  /** The first delay's upper bound; doubled after each failed attempt. Default 500. */
  minDelayMs?: number;
  /** The cap of the upper bound. Default 20000. */
  maxDelayMs?: number;
}

export interface CommonOptions {
  /** Default globalThis.WebSocket. In Node before 22, pass the ws package's. */
  WebSocket?: WebSocketConstructor;
  /** Backoff bounds, or false not to reconnect at all. */
  reconnect?: ReconnectOptions | false;
  /** Calls that may wait for a connection; one more rejects. Default 1000. */
  maxQueued?: number;
  /** Message ids (and, apart, receipt ids) remembered to drop duplicate deliveries. Default 10000. */
  dedupeSize?: number;
}

/** A token, or getToken: called before every connection attempt, so that an expired token can be replaced. */
export type ClientOptions = CommonOptions &
  ({ token: string; getToken?: never } | { getToken: () => string | Promise<string>; token?: never });

export interface ClientEvents {
  open: (result: AuthResult) => void;
  /** Each message id once; the ACK waits for the listener's promise. A listener that throws or rejects leaves it unacknowledged. */
  message: (message: Message) => void | Promise<unknown>;
  /** Each receipt id once; ACKed like a message, after the listener's promise. */
  receipt: (receipt: Receipt) => void | Promise<unknown>;
  /** Not answered, never repeated; a listener's promise is not waited for. */
  signal: (signal: Signal) => void;
  close: (info: CloseInfo) => void;
  error: (error: Error) => void;
}

export declare class DevastatorClient {
  constructor(url: string, options: ClientOptions);
  readonly state: State;
  /** The user of the last successful auth, or null before one. */
  readonly user: string | null;
  /** The device of the last successful auth, or null before one. */
  readonly device: string | null;
  on<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): () => void;
  connect(): Promise<AuthResult>;
  send(to: string | string[], message: unknown, options?: SendOptions): Promise<SendResult>;
  /** msg.read; queued and retried across reconnects like send(). */
  markRead(ids: string[]): Promise<"ACK">;
  /** msg.signal; rejects at once with ConnectionError when not connected. */
  signal(to: string | string[], data: unknown): Promise<"ACK">;
  /** msg.history with a user, newest first. */
  history(withUser: string, options?: HistoryOptions): Promise<HistoryPage>;
  call<T = unknown>(method: string, params?: unknown): Promise<T>;
  ping(): Promise<"pong">;
  close(): void;
}

export declare class RpcError extends Error {
  constructor(code: number, message: string, data?: unknown);
  readonly code: number;
  readonly data: unknown;
}

export declare class ConnectionError extends Error {
  constructor(code: number, reason: string);
  /** The WebSocket close code, or the one conn.close gave. */
  readonly code: number;
  readonly reason: string;
}

export declare const ErrorCode: {
  readonly PARSE_ERROR: -32700;
  readonly INVALID_REQUEST: -32600;
  readonly METHOD_NOT_FOUND: -32601;
  readonly INVALID_PARAMS: -32602;
  readonly INTERNAL_ERROR: -32603;
  readonly NOT_AUTHENTICATED: -32001;
  readonly FORBIDDEN: -32002;
  readonly OVERLOADED: -32003;
  readonly TOO_LARGE: -32004;
  readonly UNKNOWN_RECIPIENT: -32005;
};

export declare const CloseCode: {
  readonly NORMAL: 1000;
  readonly GOING_AWAY: 1001;
  readonly PROTOCOL_ERROR: 1002;
  readonly UNSUPPORTED_DATA: 1003;
  readonly ABNORMAL: 1006;
  readonly INVALID_DATA: 1007;
  readonly POLICY_VIOLATION: 1008;
  readonly INTERNAL_ERROR: 1011;
  readonly TRY_AGAIN_LATER: 1013;
  readonly REPLACED: 4001;
  readonly REVOKED: 4002;
  readonly IDLE_TIMEOUT: 4003;
  readonly SLOW_CONSUMER: 4004;
};
