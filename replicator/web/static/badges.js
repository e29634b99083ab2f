/* badges.js: live badge counts from replicator, one stream per browser, no dependencies.
 *
 * A classic script that defines `ReplicatorBadges` on the global object, so it works as
 * <script src="/badges.js">, as `import "/badges.js"` in a module (or through /badges.mjs,
 * which exports the same functions), and as a shared worker; CommonJS gets the same object as
 * module.exports.
 *
 *   const badges = ReplicatorBadges.connect({
 *     token: "<jwt>",                        // or a function returning one (or a promise)
 *     onChange(state, status) { ... },       // called on every new state or status
 *   });
 *   badges.state          // the user's whole state, null before the first
 *   badges.status         // {connected, live, lagMs, error}
 *   await badges.sync(lsn) // the state once it holds every commit up to lsn
 *   badges.close();
 *
 * One stream per browser: the tabs of one origin and user share one stream, through a shared
 * worker running this same file (`share: "worker"`, the default), or through one leader tab
 * elected with Web Locks that relays over a BroadcastChannel (`share: "locks"`, also where
 * shared workers do not exist). `share: false` gives the tab a stream of its own.
 *
 * The token never goes into a URL: each connect trades it (Authorization header) for a
 * single-use ticket from POST /v1/badges/ticket, and the stream URL carries the ticket. When
 * the token expires the service ends the stream with `reauthenticate`: a token function is
 * asked for a fresh token and the client reconnects at once; a fixed token stops the client
 * with error "token expired". When the service shuts down (a restart, a deploy) it ends the
 * stream with `reconnect`, saying when to come back (spread so that a crowd returns at the pace
 * the service can take) and usually handing a ticket for it: the client comes back then, with
 * that ticket, in one request.
 */
(function () {
  "use strict";

  const scope = globalThis;
  // Tabs and workers of different versions of this file never share a stream.
  const PROTOCOL = "replicator-badges/2";
  const DEFAULTS = {
    url: "/v1/badges/stream",
    token: null, // null: rely on the access_token cookie
    withCredentials: false, // send cookies cross-origin
    minDelay: 1000,
    maxDelay: 30000,
    onChange: null,
    share: "worker", // "worker", "locks" or false
    workerUrl: null, // this file on the page's own origin (default: where it was loaded from)
  };
  // A leader tab says it is alive this often; a visible tab takes the lead after this long
  // without a word from it (a leader that was frozen or hangs).
  const BEAT_MS = 1000;
  const LEAD_TIMEOUT_MS = 4000;
  // A tab that does not answer the worker's request for a token this fast is gone.
  const TOKEN_TIMEOUT_MS = 10000;
  // A shared worker that says nothing this long after a tab joins does not run this file.
  const WORKER_TIMEOUT_MS = 5000;
  // A wake-up this soon after an attempt started (and while it goes on) leaves it alone.
  const WAKE_AGAIN_MS = 1000;
  const OFFLINE = { connected: false, live: false };
  // The longest wait before coming back after a shutdown that a service can ask for.
  const LONGEST_COME_BACK_MS = 300000;

  const inWorker =
    typeof SharedWorkerGlobalScope === "function" && scope instanceof SharedWorkerGlobalScope;
  const ownUrl =
    typeof document === "object" && document.currentScript ? document.currentScript.src : null;

  // -- the state ---------------------------------------------------------------------------

  // Fold a `badges-change` into the state it follows and return the new state: each map in
  // the change lists the counterparts whose counts moved (0: cleared, so removed), every other
  // field (totals, lsn) is new. Each new state is a new object, and so is each map that
  // changed; maps that did not change are shared.
  function mergeBadges(state, change) {
    const next = { ...state };
    for (const key of Object.keys(change)) {
      const value = change[key];
      if (value !== null && typeof value === "object") {
        const moved = Object.keys(value);
        if (moved.length === 0 && key in state) continue;
        const counts = { ...state[key] };
        for (const counterpart of moved) {
          if (value[counterpart] === 0) delete counts[counterpart];
          else counts[counterpart] = value[counterpart];
        }
        next[key] = counts;
      } else {
        next[key] = value;
      }
    }
    return next;
  }

  // Every event a stream delivers goes through here: the stream's state after the event,
  // from its state before (null until its first `badges`). Null when the event cannot
  // apply: a change with no whole state before it, so the stream must start over.
  function applyEvent(state, type, data) {
    if (type === "badges") return data;
    if (type === "badges-change") return state === null ? null : mergeBadges(state, data);
    return state;
  }

  function compareLsn(a, b) {
    const [ah, al] = String(a).split("/").map((part) => parseInt(part, 16));
    const [bh, bl] = String(b).split("/").map((part) => parseInt(part, 16));
    return ah - bh || al - bl;
  }

  // The later of two whole states, by the LSN each is exact at; either may be null.
  function newer(a, b) {
    if (!a) return b;
    if (!b) return a;
    return compareLsn(b.lsn, a.lsn) > 0 ? b : a;
  }

  // -- tokens and requests -----------------------------------------------------------------

  async function tokenFrom(option) {
    const token = typeof option === "function" ? await option() : option;
    return token || null;
  }

  // Whose stream a token opens, to let the tabs of one user share it: the token's `sub`,
  // read but not verified (the service verifies every token). A token without one shares
  // only with itself; without a token the cookie decides, one user per browser.
  function subjectOf(token) {
    if (!token) return "cookie";
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const claims = JSON.parse(atob(part));
      if (claims.sub !== undefined && claims.sub !== null) return "sub:" + String(claims.sub);
    } catch {
      // not a JWT we can read: keep it to itself
    }
    return "token:" + token;
  }

  function requestInit(token, withCredentials, init) {
    const result = { cache: "no-store", ...init };
    if (token) {
      result.headers = { Authorization: `Bearer ${token}` };
      result.credentials = "omit";
    } else {
      result.credentials = withCredentials ? "include" : "same-origin";
    }
    return result;
  }

  // `GET /v1/badges` beside a stream URL.
  function snapshotUrl(streamUrl) {
    const url = new URL(streamUrl);
    url.pathname = url.pathname.replace(/\/stream$/, "");
    url.search = "";
    return url;
  }

  function messageOf(err) {
    return String((err && err.message) || err);
  }

  // -- one stream --------------------------------------------------------------------------

  // Owns one EventSource at a time: tickets, the backoff, reauthentication, waking up.
  // `getToken()` resolves to {token, refreshable}; `onUpdate(state, status)` hears every
  // change. Whichever context holds the stream runs one: a tab, the leader tab, the worker.
  class Link {
    constructor(options, getToken, onUpdate) {
      this.options = options;
      this.state = null;
      this.status = { connected: false, live: false, lagMs: 0, error: null };
      this._getToken = getToken;
      this._onUpdate = onUpdate;
      this._refreshable = false;
      this._source = null;
      this._timer = null;
      this._delay = 0;
      // a ticket the service handed out for coming back after its shutdown
      this._resume = null;
      this._attempt = 0;
      this._openedAt = 0;
      this._closed = false;
      this._open();
    }

    close() {
      this._closed = true;
      this._attempt += 1;
      clearTimeout(this._timer);
      if (this._source) this._source.close();
      this._source = null;
    }

    // Reconnect now instead of waiting out the backoff: the network is back, the page is
    // visible again or shown from the back/forward cache. `force` also replaces an open
    // stream (after a network change it may be dead without knowing it).
    wake(force) {
      if (this._closed || this.status.error) return;
      if (this._source && this.status.connected && !force) return;
      // Every tab of a shared stream passes the same wake-up on: one fresh attempt is enough.
      const trying = this._openedAt && performance.now() - this._openedAt < WAKE_AGAIN_MS;
      if (trying && !this.status.connected) return;
      this._delay = 0;
      this._restart();
    }

    // The browser says it is offline: the counts are not live, whatever the socket thinks.
    offline() {
      if (this._closed || this.status.error) return;
      if (!this._source && !this.status.connected) return; // already waiting to retry
      this._drop();
      this._update(OFFLINE);
      this._retry();
    }

    _drop() {
      this._attempt += 1;
      this._openedAt = 0;
      clearTimeout(this._timer);
      if (this._source) this._source.close();
      this._source = null;
    }

    _restart() {
      this._drop();
      this._open();
    }

    async _open() {
      const attempt = ++this._attempt;
      this._openedAt = performance.now();
      const url = new URL(this.options.url);
      let token;
      // A ticket for coming back is kept until a stream opens with it or the service refuses
      // it: a restart may take longer than the wait the service asked for.
      const resume = this._resume;
      if (resume) {
        url.searchParams.set("ticket", resume);
      } else {
        try {
          const found = await this._getToken();
          if (attempt !== this._attempt) return;
          token = found.token;
          this._refreshable = found.refreshable;
          if (token) {
            const ticket = await this._ticket(url, token, attempt);
            if (ticket === null) return;
            url.searchParams.set("ticket", ticket);
          }
        } catch (err) {
          if (attempt === this._attempt) this._stop(messageOf(err));
          return;
        }
      }
      const source = new EventSource(url, { withCredentials: this.options.withCredentials });
      this._source = source;
      let opened = false;
      // this stream's own state: a change applies to what this stream has sent
      let base = null;
      // The server sends a `status` event on connect only when replication is down.
      let serverLive = true;
      const current = () => this._source === source;
      source.addEventListener("open", () => {
        opened = true;
        if (resume && this._resume === resume) this._resume = null; // used: single-use
      });
      source.addEventListener("status", (event) => {
        if (!current()) return;
        const data = JSON.parse(event.data);
        serverLive = data.live;
        this._update({ connected: true, live: data.live, lagMs: data.lag_ms });
      });
      const onBadges = (event) => {
        if (!current()) return;
        const next = applyEvent(base, event.type, JSON.parse(event.data));
        if (next === null) {
          this._drop();
          this._retry();
          return;
        }
        base = this.state = next;
        this._delay = 0;
        this._update({ connected: true, live: serverLive });
      };
      source.addEventListener("badges", onBadges);
      source.addEventListener("badges-change", onBadges);
      source.addEventListener("reauthenticate", () => {
        // The token expired. The counts stay current: the next stream starts with the
        // whole state, so the status is left as it is while reconnecting.
        if (!current()) return;
        this._drop();
        if (this._refreshable) this._open();
        else this._stop("token expired");
      });
      source.addEventListener("reconnect", (event) => {
        // The service is going away: come back when it says, with the ticket it gave.
        if (!current()) return;
        let data = null;
        try {
          data = JSON.parse(event.data);
        } catch {
          // come back as after any other drop
        }
        this._drop();
        this._update(OFFLINE);
        this._comeBack(data);
      });
      source.addEventListener("error", () => {
        // EventSource retries network errors by itself, but gives up after an HTTP error:
        // take over both, so every retry follows one backoff and a refused token stops it.
        if (!current()) return;
        this._drop();
        this._update(OFFLINE);
        if (opened) this._retry();
        else this._check(url, token, resume);
      });
    }

    // Trade the token for a stream ticket; null when the attempt is over (stopped or retrying).
    async _ticket(url, token, attempt) {
      const ticketUrl = new URL(url);
      ticketUrl.pathname = ticketUrl.pathname.replace(/\/stream$/, "/ticket");
      let response;
      try {
        response = await fetch(ticketUrl, requestInit(token, false, { method: "POST" }));
      } catch {
        if (attempt === this._attempt) this._retry(); // the service is unreachable
        return null;
      }
      if (attempt !== this._attempt) return null;
      if (response.status === 401 || response.status === 403) {
        this._stop("unauthorized");
        return null;
      }
      if (!response.ok) {
        this._retry();
        return null;
      }
      return (await response.json()).ticket;
    }

    // The stream failed before it opened: ask the snapshot endpoint why.
    async _check(url, token, resume) {
      const attempt = this._attempt;
      let status = 0;
      try {
        const init = requestInit(token, this.options.withCredentials);
        status = (await fetch(snapshotUrl(url), init)).status;
      } catch {
        // the service is unreachable: retry
      }
      if (attempt !== this._attempt) return;
      if (resume) {
        // A service that answers did not take the ticket (it expired, or this instance does
        // not share the secret): no reason to doubt the token, just to come back as usual.
        if (status && this._resume === resume) this._resume = null;
        this._retry();
      } else if (status === 401 || status === 403) this._stop("unauthorized");
      else this._retry();
    }

    _retry() {
      if (this._closed) return;
      const { minDelay, maxDelay } = this.options;
      this._openedAt = 0; // not trying now: waiting to
      this._delay = this._delay ? Math.min(this._delay * 2, maxDelay) : minDelay;
      const wait = this._delay * (0.9 + 0.2 * Math.random());
      clearTimeout(this._timer);
      this._timer = setTimeout(() => this._open(), wait);
    }

    // The service said when to come back (`retry_ms`), maybe with a ticket for it.
    _comeBack(data) {
      if (this._closed) return;
      const wait = data && data.retry_ms;
      if (!(Number.isFinite(wait) && wait >= 0)) {
        this._retry();
        return;
      }
      this._openedAt = 0;
      this._delay = 0;
      this._resume = typeof data.ticket === "string" ? data.ticket : null;
      clearTimeout(this._timer);
      this._timer = setTimeout(() => this._open(), Math.min(wait, LONGEST_COME_BACK_MS));
    }

    _stop(error) {
      this.close();
      this._update({ connected: false, live: false, error });
    }

    _update(changes) {
      this.status = { ...this.status, ...changes };
      this._onUpdate(this.state, this.status);
    }
  }

  function linkOptions(options, url) {
    const { withCredentials, minDelay, maxDelay } = options;
    return { url: String(url), withCredentials, minDelay, maxDelay };
  }

  // Calls `wake(force)` when the page or the network comes back, and `offline()` when the
  // network goes; returns what removes the listeners.
  function watchWakeUps(wake, offline) {
    const online = () => wake(true);
    const visible = () => {
      if (document.visibilityState === "visible") wake(false);
    };
    const shown = (event) => {
      if (event.persisted) wake(false);
    };
    scope.addEventListener("online", online);
    scope.addEventListener("offline", offline);
    scope.addEventListener("pageshow", shown);
    if (typeof document === "object") document.addEventListener("visibilitychange", visible);
    return () => {
      scope.removeEventListener("online", online);
      scope.removeEventListener("offline", offline);
      scope.removeEventListener("pageshow", shown);
      if (typeof document === "object") {
        document.removeEventListener("visibilitychange", visible);
      }
    };
  }

  // Calls `away()` when the page is frozen or hidden for good (or for the back/forward
  // cache) and `back()` when it returns; returns what removes the listeners.
  function watchLifecycle(away, back) {
    const hidden = () => away();
    const shown = (event) => {
      if (event.persisted) back();
    };
    const resumed = () => back();
    document.addEventListener("freeze", hidden);
    document.addEventListener("resume", resumed);
    scope.addEventListener("pagehide", hidden);
    scope.addEventListener("pageshow", shown);
    return () => {
      document.removeEventListener("freeze", hidden);
      document.removeEventListener("resume", resumed);
      scope.removeEventListener("pagehide", hidden);
      scope.removeEventListener("pageshow", shown);
    };
  }

  // -- a tab's own stream (share: false) ---------------------------------------------------

  class OwnStream {
    constructor(client) {
      this.mode = false;
      this.leading = true;
      this.link = new Link(client.linkOptions, client.tokenSource(), (state, status) =>
        client.receive(state, status),
      );
      this._unwatch = watchWakeUps(
        (force) => this.link.wake(force),
        () => this.link.offline(),
      );
    }

    close() {
      this._unwatch();
      this.link.close();
    }
  }

  // -- one leader tab, elected with Web Locks (share: "locks") ----------------------------

  class LeaderElection {
    constructor(client, key) {
      this.mode = "locks";
      this.leading = false;
      this._client = client;
      this._id = Math.random().toString(36).slice(2) + Date.now().toString(36);
      this._lockName = `${PROTOCOL} lead ${key}`;
      this._channel = new BroadcastChannel(`${PROTOCOL} ${key}`);
      this._channel.onmessage = (event) => this._message(event.data);
      this._link = null;
      this._lease = null;
      this._release = null;
      this._request = null;
      this._heard = performance.now();
      // so that the tabs that notice a silent leader together do not all take its place
      this._patience = LEAD_TIMEOUT_MS + Math.random() * 2 * BEAT_MS;
      this._closed = false;
      this._timer = setInterval(() => this._tick(), BEAT_MS);
      this._unwatch = watchWakeUps(
        (force) => this._wake(force),
        () => this._offline(),
      );
      this._unwatchLifecycle = watchLifecycle(
        () => this._letGo(),
        () => this._join(),
      );
      this._join();
    }

    close() {
      this._closed = true;
      clearInterval(this._timer);
      this._unwatch();
      this._unwatchLifecycle();
      this._letGo();
      this._channel.close();
    }

    // Queue for the lead, and ask whoever leads for the current state.
    _join() {
      if (this._closed || this.leading || this._request) return;
      this._heard = performance.now();
      this._request = new AbortController();
      this._ask({ signal: this._request.signal });
      this._post({ type: "hello" });
    }

    // Take the lead from a leader that says nothing (frozen, or hanging).
    _steal() {
      if (this._request) this._request.abort();
      this._request = null;
      this._ask({ steal: true });
    }

    _ask(lockOptions) {
      const lease = {};
      navigator.locks
        .request(this._lockName, lockOptions, () => this._lead(lease))
        .catch(() => {
          // Aborted while queued (this tab let go or steals), or the lead was stolen from
          // this tab (it was frozen or hung): then it follows again.
          if (this._lease === lease) {
            this._handOver();
            this._join();
          }
        });
    }

    // Holds the lock until the returned promise settles, which `_handOver` does.
    _lead(lease) {
      this._request = null;
      if (this._closed) return undefined;
      this._lease = lease;
      this.leading = true;
      const client = this._client;
      this._link = new Link(client.linkOptions, client.tokenSource(), (state, status) => {
        client.receive(state, status);
        this._post({ type: "state", state: client.streamState, status });
        // A refused token: let a tab with another token try, and stay out of the queue.
        if (status.error) this._handOver();
      });
      this._post({ type: "beat" });
      return new Promise((resolve) => {
        this._release = resolve;
      });
    }

    _handOver() {
      if (!this.leading) return;
      this.leading = false;
      this._lease = null;
      if (this._link) this._link.close();
      this._link = null;
      if (this._release) this._release();
      this._release = null;
      this._post({ type: "bye" });
    }

    // Frozen, or leaving: hand the stream over now, and do not queue while away.
    _letGo() {
      if (this._request) this._request.abort();
      this._request = null;
      this._handOver();
    }

    _tick() {
      if (this.leading) {
        this._post({ type: "beat" });
        return;
      }
      // Only a tab someone looks at takes the lead on silence: hidden tabs' timers are
      // throttled, and a hidden leader's beats may be late without it being gone.
      const visible = typeof document !== "object" || document.visibilityState === "visible";
      if (this._request && visible && performance.now() - this._heard > this._patience) {
        this._steal();
      }
    }

    _wake(force) {
      if (this.leading) this._link.wake(force);
      else {
        this._post({ type: "wake", force });
        this._tick();
      }
    }

    _offline() {
      if (this.leading) this._link.offline();
    }

    _post(message) {
      if (!this._closed) this._channel.postMessage({ ...message, from: this._id });
    }

    _message(message) {
      if (this.leading) {
        if (message.type === "hello" && this._link) {
          this._post({ type: "state", state: this._client.streamState, status: this._link.status });
        } else if (message.type === "wake") {
          this._link.wake(message.force);
        }
        return;
      }
      if (message.type === "state" || message.type === "beat" || message.type === "bye") {
        this._heard = performance.now();
      }
      if (message.type === "state") this._client.receive(message.state, message.status);
    }
  }

  // -- a shared worker holds the stream (share: "worker") ----------------------------------

  class WorkerShare {
    constructor(client, key, workerUrl, onFailure) {
      this.mode = "worker";
      this.leading = false;
      this._client = client;
      this._key = key;
      this._workerUrl = workerUrl;
      this._onFailure = onFailure;
      this._closed = false;
      this._heard = false;
      this._port = null;
      this._start();
      this._unwatch = watchWakeUps(
        (force) => this._post({ type: "wake", force }),
        () => this._post({ type: "offline" }),
      );
      this._unwatchLifecycle = watchLifecycle(
        () => this._post({ type: "leave" }),
        () => this._join(),
      );
    }

    close() {
      this._post({ type: "leave" });
      this._closed = true;
      this._unwatch();
      this._unwatchLifecycle();
      if (this._port) this._port.close();
      clearTimeout(this._timer);
    }

    _start() {
      // throws (SecurityError) for a script of another origin: the caller falls back
      const worker = new SharedWorker(this._workerUrl, { name: `${PROTOCOL} ${this._key}` });
      const port = (this._port = worker.port);
      worker.addEventListener("error", () => this._fail());
      port.onmessage = (event) => this._message(port, event.data);
      port.start();
      this._heard = false;
      this._timer = setTimeout(() => this._fail(), WORKER_TIMEOUT_MS);
      this._join();
    }

    // The worker could not run this file: share through a leader tab instead.
    _fail() {
      if (this._heard || this._closed) return;
      this.close();
      this._onFailure();
    }

    _join() {
      const client = this._client;
      this._post({
        type: "join",
        key: this._key,
        options: client.linkOptions,
      });
    }

    _post(message) {
      if (this._port && !this._closed) this._port.postMessage(message);
    }

    _message(port, message) {
      if (port !== this._port || this._closed) return;
      if (!this._heard) {
        this._heard = true;
        clearTimeout(this._timer);
      }
      if (message.type === "update") {
        this._client.receive(message.state, message.status);
      } else if (message.type === "token") {
        const { id } = message;
        this._client.tokenSource()().then(
          (found) => port.postMessage({ type: "token", id, ...found }),
          (err) => port.postMessage({ type: "token", id, error: messageOf(err) }),
        );
      } else if (message.type === "joined") {
        // The worker holds this lock while it lives: when this tab gets it, the worker is
        // gone (ended by the browser, or it crashed), and a new one takes over.
        navigator.locks.request(message.lock, () => {
          if (this._port === port && !this._closed) {
            port.close();
            this._start();
          }
        });
      }
    }
  }

  // The worker's side: one stream per key (origin and user), for every tab that joined it.
  function runWorker() {
    const groups = new Map();

    function open(key) {
      const group = {
        key,
        ports: new Set(),
        pending: new Map(),
        nextId: 0,
        held: false,
        release: null,
        lock: `${PROTOCOL} worker ${key}`,
        link: null,
      };
      groups.set(key, group);
      navigator.locks.request(group.lock, () => {
        if (groups.get(key) !== group) return undefined;
        group.held = true;
        for (const port of group.ports) port.postMessage({ type: "joined", lock: group.lock });
        return new Promise((resolve) => {
          group.release = resolve;
        });
      });
      return group;
    }

    function newLink(group, options) {
      return new Link(options, () => askToken(group), (state, status) => {
        for (const port of group.ports) port.postMessage({ type: "update", state, status });
      });
    }

    function leave(group, port) {
      group.ports.delete(port);
      if (group.ports.size > 0 || groups.get(group.key) !== group) return;
      groups.delete(group.key);
      if (group.link) group.link.close();
      if (group.release) group.release();
    }

    // A token from one of the tabs, the newest first; a tab that does not answer is gone.
    async function askToken(group) {
      for (const port of [...group.ports].reverse()) {
        const id = ++group.nextId;
        const reply = await new Promise((resolve) => {
          group.pending.set(id, resolve);
          setTimeout(() => resolve(null), TOKEN_TIMEOUT_MS);
          port.postMessage({ type: "token", id });
        });
        group.pending.delete(id);
        if (reply === null) {
          group.ports.delete(port);
          continue;
        }
        if (reply.error) throw new Error(reply.error);
        return reply;
      }
      // every tab is gone: so is the stream (a tab that joins later starts another)
      if (groups.get(group.key) === group) groups.delete(group.key);
      if (group.release) group.release();
      throw new Error("no tab answered with a token");
    }

    function message(port, data) {
      const group = port.group;
      if (data.type === "join") {
        const joined = groups.get(data.key) || open(data.key);
        if (group && group !== joined) leave(group, port);
        port.group = joined;
        joined.ports.add(port);
        // The first tab starts the stream; after a refused token, the newest tries its own.
        if (!joined.link || joined.link.status.error) {
          joined.link = newLink(joined, data.options);
        }
        const link = joined.link;
        if (link.state || link.status.error) {
          port.postMessage({ type: "update", state: link.state, status: link.status });
        }
        if (joined.held) port.postMessage({ type: "joined", lock: joined.lock });
      } else if (!group || !group.link) {
        return;
      } else if (data.type === "leave") {
        port.group = null;
        leave(group, port);
      } else if (data.type === "token") {
        const resolve = group.pending.get(data.id);
        if (resolve) resolve(data);
      } else if (data.type === "wake") {
        group.link.wake(data.force);
      } else if (data.type === "offline") {
        group.link.offline();
      }
    }

    scope.addEventListener("connect", (event) => {
      const port = event.ports[0];
      port.onmessage = (e) => message(port, e.data);
      port.start();
    });
    scope.addEventListener("online", () => {
      for (const group of groups.values()) if (group.link) group.link.wake(true);
    });
  }

  // -- what connect() returns --------------------------------------------------------------

  class BadgeClient {
    constructor(options) {
      this.options = { ...DEFAULTS, ...options };
      const mode = this.options.share;
      if (mode !== false && mode !== "worker" && mode !== "locks") {
        throw new TypeError(`share must be "worker", "locks" or false, not ${String(mode)}`);
      }
      this.state = null;
      this.status = { connected: false, live: false, lagMs: 0, error: null };
      this.streamState = null;
      this._synced = null;
      this._share = null;
      this._closed = false;
      const base = scope.location ? scope.location.href : undefined;
      this.url = new URL(this.options.url, base);
      this.linkOptions = linkOptions(this.options, this.url);
      this._start();
    }

    // How this tab gets its counts: "worker", "locks", or false (a stream of its own).
    get share() {
      return this._share ? this._share.mode : null;
    }

    // Whether this tab holds the stream itself.
    get leading() {
      return Boolean(this._share && this._share.leading);
    }

    close() {
      this._closed = true;
      if (this._share) this._share.close();
    }

    // The state once it holds every transaction committed at or before `lsn` (what
    // pg_current_wal_lsn() returned after the app's own commit), from GET /v1/badges.
    async sync(lsn) {
      const url = snapshotUrl(this.url);
      url.searchParams.set("min_lsn", lsn);
      const token = await tokenFrom(this.options.token);
      const response = await fetch(url, requestInit(token, this.options.withCredentials));
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        const err = new Error(body.message || `HTTP ${response.status}`);
        err.status = response.status;
        err.retryAfter = Number(response.headers.get("Retry-After")) || null;
        throw err;
      }
      this._synced = newer(this._synced, await response.json());
      this._show();
      return this.state;
    }

    // What a Link calls on every connect: the token, and whether asking again may give a
    // fresh one.
    tokenSource() {
      const option = this.options.token;
      const refreshable = typeof option === "function";
      return async () => ({ token: await tokenFrom(option), refreshable });
    }

    receive(state, status) {
      if (this._closed) return;
      // A new holder of the stream has no state until its stream sends one: keep the last.
      if (state) this.streamState = state;
      this.status = status;
      this._show();
    }

    _show() {
      this.state = newer(this.streamState, this._synced);
      if (this.options.onChange) this.options.onChange(this.state, this.status);
    }

    async _start() {
      let mode = this.options.share;
      let key = null;
      if (mode) {
        try {
          key = `${this.url} ${subjectOf(await tokenFrom(this.options.token))}`;
        } catch (err) {
          this.receive(null, { ...this.status, error: messageOf(err) });
          return;
        }
        if (this._closed) return;
      }
      if (mode === "worker" && typeof SharedWorker !== "function") mode = "locks";
      if (mode === "worker") {
        const workerUrl = new URL(this.options.workerUrl || ownUrl || "/badges.js", this.url);
        try {
          this._share = new WorkerShare(this, key, workerUrl, () => this._fallBack(key));
          return;
        } catch {
          mode = "locks"; // a worker script of another origin
        }
      }
      if (mode === "locks" && !(scope.navigator && navigator.locks && scope.BroadcastChannel)) {
        mode = false;
      }
      this._share = mode === "locks" ? new LeaderElection(this, key) : new OwnStream(this);
    }

    _fallBack(key) {
      if (this._closed) return;
      this._share = new LeaderElection(this, key);
    }
  }

  function connect(urlOrOptions, options) {
    if (typeof urlOrOptions === "string") return new BadgeClient({ ...options, url: urlOrOptions });
    return new BadgeClient(urlOrOptions);
  }

  const api = { connect, mergeBadges, applyEvent, BadgeClient };
  if (typeof module === "object" && module && module.exports) module.exports = api;
  scope.ReplicatorBadges = api;
  if (inWorker) runWorker();
})();
