"""The client's files as an app gets them: badges.d.ts types an app's use of badges.mjs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parents[1] / "replicator" / "web" / "static"

APP = """\
import { connect, mergeBadges, type BadgeState, type SyncError } from "./badges.mjs";
import badges from "./badges.mjs";

const client = connect({
  token: async () => "jwt",
  share: "locks",
  onChange(state: BadgeState | null, status) {
    const total: number | undefined = state?.total_unread_messages;
    if (status.error !== null) console.log(status.error.toUpperCase(), total, status.lagMs);
  },
});
const other = badges.connect("/v1/badges/stream", { share: false, workerUrl: "/badges.js" });
async function read(): Promise<void> {
  try {
    const state = await client.sync("0/16B3748");
    console.log(state.lsn, state.unread_messages?.["sender"]);
  } catch (err) {
    const failed = err as SyncError;
    console.log(failed.status, failed.retryAfter);
  }
}
void read();
const merged: BadgeState = mergeBadges({ user_id: "u", lsn: "0/1" }, { total_missed_calls: 2 });
globalThis.ReplicatorBadges.connect({ url: new URL("https://badges.example.com/v1/badges") });
console.log(merged, other.share, client.leading);
other.close();
// @ts-expect-error: share is "worker", "locks" or false
connect({ share: "tabs" });
// @ts-expect-error: a state has no number for user_id
const wrong: BadgeState = { user_id: 1, lsn: "0/1" };
console.log(wrong);
"""


def test_the_type_declarations_check_an_apps_use_of_the_module(tmp_path: Path) -> None:
    tsc = shutil.which("tsc")
    if tsc is None:
        pytest.fail("tsc is missing: run scripts/system-deps.sh (make system-deps)")
    # TypeScript pairs a .mjs module with its .d.mts declarations
    shutil.copy(STATIC / "badges.d.ts", tmp_path / "badges.d.mts")
    shutil.copy(STATIC / "badges.mjs", tmp_path / "badges.mjs")
    (tmp_path / "app.mts").write_text(APP)
    result = subprocess.run(
        [
            tsc,
            "--strict",
            "--noEmit",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            "--target",
            "es2022",
            "--lib",
            "es2022,dom",
            "app.mts",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
