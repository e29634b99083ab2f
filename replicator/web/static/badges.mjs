// badges.mjs: badges.js as an ES module. It loads badges.js from beside itself, which a shared
// worker of a page on the same origin runs too.
import "./badges.js";

const api = globalThis.ReplicatorBadges;
const workerUrl = new URL("./badges.js", import.meta.url).href;

export function connect(urlOrOptions, options) {
  if (typeof urlOrOptions === "string") {
    return api.connect({ workerUrl, ...options, url: urlOrOptions });
  }
  return api.connect({ workerUrl, ...urlOrOptions });
}

export const { mergeBadges, applyEvent, BadgeClient } = api;

export default { connect, mergeBadges, applyEvent, BadgeClient };
