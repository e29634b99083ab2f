/* badges.js: live unread-message and missed-call counts from replicator, no dependencies.
 *
 * A classic script that defines `ReplicatorBadges` on the global object, so it works both as
 * <script src="/badges.js"> and as `import "/badges.js"` in a module; CommonJS gets the same
 * object as module.exports.
 *
 *   const badges = ReplicatorBadges.connect({
 *     token: "<jwt>",                        // or a function returning one (or a promise)
 *     onChange(state, status) { ... },       // called on every new state or status
 *   });
 *   badges.state    // the user's whole state, null before the first event
 *   badges.status   // {connected, live, lagMs, error}
 *   badges.close();
 *
 * The stream starts with the whole state (`badges`); after that the service sends only what
 * changed (`badges-change`), which `mergeBadges` folds into the state. Each new state is a new
 * object, and so is each map that changed; maps that did not change are shared.
 *
 * The token never goes into a URL: each connect trades it (Authorization header) for a
 * single-use ticket from POST /v1/badges/ticket, and the stream URL carries the ticket. When
 * the token expires the service ends the stream with `reauthenticate`: a token function is
 * asked for a fresh token and the client reconnects at once; a fixed token stops the client
 * with error "token expired".
 */
(function () {
  "use strict";

  const DEFAULTS = {
    url: "/v1/badges/stream",
    token: null, // null: rely on the access_token cookie
    withCredentials: false, // send cookies cross-origin
    minDelay: 1000,
    maxDelay: 30000,
    onChange: null,
  };

  // Fold a `badges-change` into the state it follows and return the new state: each map in
  // the change lists the counterparts whose counts moved (0: cleared, so removed), every other
  // field (totals, lsn) is new. Self-contained, so that it can move (to a worker, say).
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

  class BadgeStream {
    constructor(options) {
      this.options = { ...DEFAULTS, ...options };
      this.state = null;
      this.status = { connected: false, live: false, lagMs: 0, error: null };
      this._source = null;
      this._timer = null;
      this._delay = 0;
      this._closed = false;
      this._open();
    }

    close() {
      this._closed = true;
      clearTimeout(this._timer);
      if (this._source) this._source.close();
      this._source = null;
    }

    async _token() {
      let token = this.options.token;
      if (typeof token === "function") token = await token();
      return token || null;
    }

    // Trade the token for a stream ticket; null when the attempt is over (stopped or retrying).
    async _ticket(url, token) {
      const ticketUrl = new URL(url);
      ticketUrl.pathname = ticketUrl.pathname.replace(/\/stream$/, "/ticket");
      let response;
      try {
        response = await fetch(ticketUrl, {
          method: "POST",
          headers: { Authorization: `Bearer ${token}` },
          credentials: "omit",
          cache: "no-store",
        });
      } catch {
        this._retry(); // the service is unreachable
        return null;
      }
      if (this._closed) return null;
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

    async _open() {
      let url;
      let token;
      try {
        const base = globalThis.location ? globalThis.location.href : undefined;
        url = new URL(this.options.url, base);
        token = await this._token();
        if (this._closed) return;
        if (token) {
          const ticket = await this._ticket(url, token);
          if (ticket === null) return;
          url.searchParams.set("ticket", ticket);
        }
      } catch (err) {
        return this._stop(String((err && err.message) || err));
      }
      if (this._closed) return;
      const source = new EventSource(url, { withCredentials: this.options.withCredentials });
      this._source = source;
      let opened = false;
      // whether this stream has sent the whole state yet (changes apply to it)
      let whole = false;
      // The server sends a `status` event on connect only when replication is down.
      let serverLive = true;
      source.addEventListener("open", () => {
        opened = true;
      });
      source.addEventListener("status", (event) => {
        const data = JSON.parse(event.data);
        serverLive = data.live;
        this._update({ connected: true, live: data.live, lagMs: data.lag_ms });
      });
      source.addEventListener("badges", (event) => {
        whole = true;
        this.state = JSON.parse(event.data);
        this._delay = 0;
        this._update({ connected: true, live: serverLive });
      });
      source.addEventListener("badges-change", (event) => {
        // Every stream starts with the whole state; a change before it has nothing to apply
        // to, so start over.
        if (!whole) {
          source.close();
          this._source = null;
          this._retry();
          return;
        }
        this.state = mergeBadges(this.state, JSON.parse(event.data));
        this._update({ connected: true, live: serverLive });
      });
      source.addEventListener("reauthenticate", () => {
        // The token expired. The counts stay current: the next stream starts with the
        // whole state, so the status is left as it is while reconnecting.
        source.close();
        if (this._source !== source) return;
        this._source = null;
        if (typeof this.options.token === "function") this._open();
        else this._stop("token expired");
      });
      source.addEventListener("error", () => {
        // EventSource retries network errors by itself, but gives up after an HTTP error:
        // take over both, so every retry follows one backoff and a refused token stops it.
        source.close();
        if (this._source !== source) return;
        this._source = null;
        this._update({ connected: false, live: false });
        if (opened) this._retry();
        else this._check(url, token);
      });
    }

    // The stream failed before it opened: ask the snapshot endpoint why.
    async _check(url, token) {
      const snapshot = new URL(url);
      snapshot.pathname = snapshot.pathname.replace(/\/stream$/, "");
      snapshot.search = "";
      let status = 0;
      try {
        const init = { cache: "no-store" };
        if (token) {
          init.headers = { Authorization: `Bearer ${token}` };
          init.credentials = "omit";
        } else {
          init.credentials = this.options.withCredentials ? "include" : "same-origin";
        }
        status = (await fetch(snapshot, init)).status;
      } catch {
        // the service is unreachable: retry
      }
      if (this._closed) return;
      if (status === 401 || status === 403) this._stop("unauthorized");
      else this._retry();
    }

    _retry() {
      if (this._closed) return;
      const { minDelay, maxDelay } = this.options;
      this._delay = this._delay ? Math.min(this._delay * 2, maxDelay) : minDelay;
      const wait = this._delay * (0.9 + 0.2 * Math.random());
      this._timer = setTimeout(() => this._open(), wait);
    }

    _stop(error) {
      this.close();
      this._update({ connected: false, live: false, error });
    }

    _update(changes) {
      this.status = { ...this.status, ...changes };
      if (this.options.onChange) this.options.onChange(this.state, this.status);
    }
  }

  function connect(urlOrOptions, options) {
    if (typeof urlOrOptions === "string") return new BadgeStream({ ...options, url: urlOrOptions });
    return new BadgeStream(urlOrOptions);
  }

  const api = { connect, BadgeStream, mergeBadges };
  if (typeof module === "object" && module && module.exports) module.exports = api;
  globalThis.ReplicatorBadges = api;
})();
