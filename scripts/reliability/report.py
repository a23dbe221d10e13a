#!/usr/bin/env python3
"""Writes RELIABILITY.md from the JSON results of the long-form fault tests and soak
(scripts/reliability/run.sh without --short).

usage: report.py RESULTS_DIR OUT.md"""

import datetime
import json
import os
import subprocess
import sys


def load(results, name):
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def fence(result):
    return "```json\n" + json.dumps(result, indent=2, sort_keys=True) + "\n```\n"


def main():
    results, out = sys.argv[1], sys.argv[2]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with open("/proc/cpuinfo") as f:
        model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kill, outage, full, soak = (load(results, n) for n in ("kill", "outage", "disk-full", "soak"))
    lines = [
        "# Reliability",
        "",
        "The guarantees of docs/DESIGN.md under faults, measured by the scripts in",
        "`scripts/reliability/` against the real release binary, moto's S3 server on loopback",
        "and the load generator `examples/loadgen.rs`. Each script exits non-zero when a",
        "guarantee is broken. CI runs the short forms (`scripts/reliability/run.sh --short`);",
        "the figures below come from one run of the long forms:",
        "",
        "```sh",
        "scripts/reliability/run.sh        # about 45 minutes; rewrites this file and docs/soak.png",
        "```",
        "",
        f"Run on {when}, commit `{commit}`, {os.cpu_count()} cores ({model}).",
        "",
        "| test | what it does | result |",
        "|---|---|---|",
    ]
    if kill:
        lines.append(
            f"| kill | {kill['rounds']} rounds of `kill -9` at random moments under {kill['rateTarget']} "
            f"key creations/s, a local and an S3 exporter at 1 s | {kill['answered']:,} keys answered; "
            f"not served after restart: {kill['answeredNotServed']}; local: {kill['localExported']:,} exported, "
            f"{kill['localMissingAnswered']} missing, {kill['localTwice']} twice; S3: {kill['s3Exported']:,} "
            f"exported, {kill['s3MissingAnswered']} missing, {kill['s3Twice']} twice |")
    if outage:
        lines.append(
            f"| outage | S3 down for {outage['outageSeconds']:g} s under load, exporter interval "
            f"{outage['intervalSeconds']} s | {outage['answered']:,} keys answered ({outage['loadFailures']} "
            f"failed); {outage['uploadFailuresDuringOutage']:g} upload failures counted; caught up "
            f"{outage['secondsToCatchUpAfterReturn']} s after the server returned; {outage['missingAnswered']} "
            f"missing, {outage['twice']} twice |")
    if full:
        lines.append(
            f"| disk full | data directory on a {full['fsSizeMb']} MiB tmpfs filled up under load | "
            f"while full: statuses {full['statusesWhileFull']}, `/readyz` {full['readyzWhileFull']}; after "
            f"space was freed: {full['resumedStatus']}; {full['answered']:,} answered, {full['exported']:,} "
            f"exported; problems: {len(full['problems'])} |")
    if soak:
        w = soak.get("afterWarmUp") or {}
        rng = lambda k: f"{w[k]['min']:g}-{w[k]['max']:g}" if k in w else "?"
        lines.append(
            f"| soak | {soak['minutes']:g} min at {soak['rateTarget']:,} key creations/s with "
            f"{len(soak['exportedKeys'])} exporters (local and S3) | {soak['answered']:,} answered "
            f"({soak['answeredPerSecond']:g}/s, p99 {soak['p99Ms']} ms), {soak['failed']} failed; after warm-up: "
            f"RSS {rng('rssMb')} MiB, open files {rng('openFiles')}, sled {rng('dbMb')} MiB; every exporter "
            f"exported all {soak['keysCreated']:,.0f} keys; warnings or errors logged: "
            f"{soak['logWarningsOrErrors']} |")
    lines += ["", "![soak: resident memory, open files, database size and rate over time](docs/soak.png)",
              "", "## Raw results", ""]
    for name, r in (("kill", kill), ("outage", outage), ("disk full", full), ("soak", soak)):
        if r:
            lines += [f"### {name}", "", fence(r)]
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
