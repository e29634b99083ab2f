// The demo page: the demo user on two devices, each a client with a stream of its own.
"use strict";
(function () {
  // The token comes from the fragment only (never sent to a server, never in a log), and
  // leaves the address bar at once, so it is not bookmarked, shared or kept in history.
  const token = new URLSearchParams(location.hash.slice(1)).get("access_token");
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);

  const $ = (root, id) => root.querySelector(`[data-testid="${id}"]`);
  const log = (text) => {
    $(document, "log").textContent = text;
  };
  let contacts = {};
  const idOf = (name) => Object.keys(contacts).find((id) => contacts[id] === name);

  const shortId = (id) => id.slice(0, 8) + "…";
  const hue = (id) =>
    [...id].reduce((h, c) => Math.imul(h ^ c.charCodeAt(0), 16777619) >>> 0, 2166136261) % 360;

  function row(kind, id, count) {
    const li = document.createElement("li");
    li.dataset[kind] = id;
    li.dataset.count = count;
    const name = contacts[id];
    const avatar = document.createElement("span");
    avatar.className = "avatar";
    avatar.style.background = `hsl(${hue(id)} 50% 45%)`;
    avatar.textContent = (name || id).charAt(0).toUpperCase();
    const label = document.createElement("span");
    label.className = "name";
    label.title = id;
    if (name) label.textContent = name;
    else label.append(Object.assign(document.createElement("code"), { textContent: shortId(id) }));
    const badge = document.createElement("span");
    badge.className = "count";
    badge.textContent = count;
    li.append(avatar, label, badge);
    return li;
  }

  function fill(list, kind, counts, empty) {
    const label = (id) => contacts[id] || id;
    const entries = Object.entries(counts || {}).sort(
      ([a, x], [b, y]) => y - x || label(a).localeCompare(label(b)),
    );
    list.replaceChildren(...entries.map(([id, n]) => row(kind, id, n)));
    if (!entries.length) {
      list.append(Object.assign(document.createElement("li"), { className: "empty", textContent: empty }));
    }
  }

  function total(el, n) {
    el.textContent = n;
    el.classList.toggle("zero", n === 0);
  }

  function render(pane, state, status) {
    const mode = status.error ? "unauthorized" : status.live ? "live" : state ? "stale" : "connecting";
    pane.dataset.state = mode;
    $(pane, "status").textContent = {
      live: "Live", stale: "Reconnecting…", connecting: "Connecting…", unauthorized: "Signed out",
    }[mode];
    if (status.error) {
      document.body.classList.add("unauthorized");
      $(document, "auth-reason").textContent = status.error === "token expired"
        ? "The token has expired." : "The token was refused or is missing.";
    }
    if (!state) return;
    $(document, "user").replaceChildren(
      "Signed in as ", Object.assign(document.createElement("code"), { textContent: state.user_id }),
    );
    fill($(pane, "unread-list"), "sender", state.unread_messages, "No unread messages");
    fill($(pane, "missed-list"), "caller", state.missed_calls, "No missed calls");
    total($(pane, "total-unread"), state.total_unread_messages);
    total($(pane, "total-missed"), state.total_missed_calls);
    $(pane, "lsn").textContent = state.lsn;
    if (pane.dataset.device === "a") {
      const n = state.total_unread_messages + state.total_missed_calls;
      document.title = (n ? `(${n}) ` : "") + "Badges · replicator";
    }
  }

  const devices = {};
  function addDevice(id, name) {
    const pane = document.getElementById("device").content.firstElementChild.cloneNode(true);
    pane.dataset.device = id;
    $(pane, "device-name").textContent = name;
    document.querySelector(".devices").append(pane);
    // Each pane is its own device: its own stream, not shared with the other pane.
    devices[id] = ReplicatorBadges.connect({
      token,
      share: false,
      onChange: (state, status) => render(pane, state, status),
    });
  }

  async function act(button) {
    const { action, contact, sync: device } = button.dataset;
    button.disabled = true;
    try {
      const response = await fetch("/v1/demo/actions", {
        method: "POST",
        headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
        body: JSON.stringify({ action, contact: contact && idOf(contact) }),
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.message);
      if (device) {
        // Read-your-writes: this device asks for the state as of its own write, so its
        // badge never shows the old count; the other device follows its stream.
        await devices[device].sync(body.lsn);
        log(`${button.textContent.trim()}: written; device ${device.toUpperCase()} asked for the`
          + " state as of its write (min_lsn) and shows it at once, the other follows its stream.");
      } else {
        log(`${button.textContent.trim()}: written; both devices follow the stream.`);
      }
    } catch (err) {
      log(`${button.textContent.trim()} failed: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  // Names are a nicety: without them rows show short user ids.
  fetch("/v1/demo/contacts")
    .then((r) => (r.ok ? r.json() : {}))
    .catch(() => ({}))
    .then((found) => {
      contacts = found;
      addDevice("a", "Device A · phone");
      addDevice("b", "Device B · laptop");
      window.devices = devices;
      for (const button of document.querySelectorAll("[data-action]")) {
        button.addEventListener("click", () => act(button));
      }
    });
  addEventListener("hashchange", () => location.reload());
})();
