// Types for badges.mjs (and the ReplicatorBadges global that badges.js defines). Beside a copy
// of badges.mjs, save this file as badges.d.mts: TypeScript pairs .mjs files with .d.mts.

/** A user's whole state, exact at one commit (`lsn`). The default badges give the fields
 * named here; a badges file gives `<name>` (counts by counterpart, when the badge has a
 * counterpart) and `total_<name>` for each of its badges. */
export interface BadgeState {
  user_id: string;
  /** the commit LSN of the state shown, PostgreSQL's X/Y text form */
  lsn: string;
  unread_messages?: Record<string, number>;
  missed_calls?: Record<string, number>;
  total_unread_messages?: number;
  total_missed_calls?: number;
  [field: string]: string | number | Record<string, number> | undefined;
}

export interface BadgeStatus {
  /** the stream (this tab's, or the one it shares) is open */
  connected: boolean;
  /** the counts are current; show them as possibly stale when false */
  live: boolean;
  /** the replication lag the service last reported */
  lagMs: number;
  /** "unauthorized" or "token expired" once the client has stopped; null while it runs */
  error: string | null;
}

export type TokenSource = string | null | (() => string | null | Promise<string | null>);

export interface ConnectOptions {
  /** the stream, relative to the page or absolute (default "/v1/badges/stream") */
  url?: string | URL;
  /** a JWT, or a function called on every connect; null relies on the access_token cookie */
  token?: TokenSource;
  onChange?: (state: BadgeState | null, status: BadgeStatus) => void;
  /** send cookies to another origin (default false) */
  withCredentials?: boolean;
  /** reconnect backoff in ms (default 1000 and 30000) */
  minDelay?: number;
  maxDelay?: number;
  /** how the tabs of one browser share one stream (default "worker") */
  share?: "worker" | "locks" | false;
  /** badges.js on the page's own origin, for the shared worker */
  workerUrl?: string | URL | null;
}

/** Thrown by `sync` when the service does not answer with a state. */
export interface SyncError extends Error {
  /** the HTTP status: 503 when the LSN was not reached in time, 400 for a bad LSN */
  status: number;
  /** seconds to wait before asking again, when the service said */
  retryAfter: number | null;
}

export declare class BadgeClient {
  constructor(options: ConnectOptions);
  /** the latest state known to this tab, null before the first */
  readonly state: BadgeState | null;
  readonly status: BadgeStatus;
  /** how this tab gets its counts (null until it has started) */
  readonly share: "worker" | "locks" | false | null;
  /** whether this tab holds the stream itself */
  readonly leading: boolean;
  /** the state once it holds every commit at or before `lsn` (rejects with a SyncError) */
  sync(lsn: string): Promise<BadgeState>;
  /** stop, for this tab only */
  close(): void;
}

export declare function connect(options?: ConnectOptions): BadgeClient;
export declare function connect(url: string, options?: ConnectOptions): BadgeClient;
/** fold a `badges-change` event's data into the state it follows */
export declare function mergeBadges(state: BadgeState, change: Partial<BadgeState>): BadgeState;
/** the state after one stream event (null: a change with no state before it) */
export declare function applyEvent(
  state: BadgeState | null,
  type: string,
  data: BadgeState | Partial<BadgeState>,
): BadgeState | null;

declare const ReplicatorBadgesApi: {
  connect: typeof connect;
  mergeBadges: typeof mergeBadges;
  applyEvent: typeof applyEvent;
  BadgeClient: typeof BadgeClient;
};
export default ReplicatorBadgesApi;

declare global {
  /** what badges.js defines when loaded as a classic script */
  var ReplicatorBadges: typeof ReplicatorBadgesApi;
}
