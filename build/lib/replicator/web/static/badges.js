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
 *   badges.state    // the last `badges` event's data, null before the first
 *   badges.status   // {connected, live, lagMs, error}
 *   badges.close();
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

    async _url() {
      const base = globalThis.location ? globalThis.location.href : undefined;
      const url = new URL(this.options.url, base);
      let token = this.options.token;
      if (typeof token === "function") token = await token();
      if (token) url.searchParams.set("access_token", token);
      return url;
    }

    async _open() {
      let url;
      try {
        url = await this._url();
      } catch (err) {
        return this._stop(String((err && err.message) || err));
      }
      if (this._closed) return;
      const source = new EventSource(url, { withCredentials: this.options.withCredentials });
      this._source = source;
      let opened = false;
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
        this.state = JSON.parse(event.data);
        this._delay = 0;
        this._update({ connected: true, live: serverLive });
      });
      source.addEventListener("error", () => {
        // EventSource retries network errors by itself, but gives up after an HTTP error:
        // take over both, so every retry follows one backoff and a refused token stops it.
        source.close();
        if (this._source !== source) return;
        this._source = null;
        this._update({ connected: false, live: false });
        if (opened) this._retry();
        else this._check(url);
      });
    }

    // The stream failed before it opened: ask the snapshot endpoint why.
    async _check(url) {
      const snapshot = new URL(url);
      snapshot.pathname = snapshot.pathname.replace(/\/stream$/, "");
      let status = 0;
      try {
        const credentials = this.options.withCredentials ? "include" : "same-origin";
        status = (await fetch(snapshot, { credentials, cache: "no-store" })).status;
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

  const api = { connect, BadgeStream };
  if (typeof module === "object" && module && module.exports) module.exports = api;
  globalThis.ReplicatorBadges = api;
})();
