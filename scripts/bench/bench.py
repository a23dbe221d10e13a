#!/usr/bin/env python3
"""The benchmark suite: every figure of BENCHMARKS.md beside its ceiling, measured in
the same run on this machine. Rewrites the figures and profiles sections of
BENCHMARKS.md (between the markers) and leaves the hand-written analysis alone.

usage: scripts/bench.sh [--quick] [--no-profile]
  --quick       a smoke run of a few seconds per figure with small key counts (CI)
  --no-profile  skip perf profiles

Load comes from wrk (Debian) with the Lua scripts in this directory, the HTTP ceiling
is examples/ceiling_server.rs driven with the same connections and duration, and the
in-process ceilings are examples/bench_ceilings.rs."""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reliability"))
import harness as h  # noqa: E402

ROOT = h.ROOT
RELEASE = os.path.join(ROOT, "target", "release")


def run_json(args, **kw):
    out = subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout
    return json.loads(out.strip().splitlines()[-1])


def wrk(url, script, args, connections, seconds, threads=2):
    return run_json(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
                     "-s", os.path.join(HERE, script), url, "--", *args])


def machine(out):
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    # The report this run rewrites does not make the code it measures dirty.
    report = os.path.relpath(os.path.abspath(out), ROOT)
    spec = [] if report.startswith("..") else ["--", ".", f":(exclude){report}"]
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *spec], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    return {"cores": os.cpu_count(), "cpu": model,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit + ("+dirty" if dirty else "")}


class Sampler:
    """Samples a process's resident memory every `every` seconds in the background."""

    def __init__(self, pid, every=0.25):
        self.pid, self.every, self.max_mb, self.stop = pid, every, 0.0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.max_mb = max(self.max_mb, int(line.split()[1]) / 1024)
            except OSError:
                pass
            time.sleep(self.every)

    def done(self):
        self.stop = True
        self.thread.join()
        return round(self.max_mb, 1)


def profile(pid, seconds, label, profiles):
    """perf record (cpu-clock) of `pid` for `seconds`; keeps the top symbols by self time."""
    if not shutil.which("perf") or profiles is None:
        return None
    data = tempfile.mktemp(suffix=".perf")

    def record():
        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-p", str(pid),
                        "-o", data, "--", "sleep", str(seconds)],
                       capture_output=True)
        report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,symbol",
                                 "--stdio"], capture_output=True, text=True).stdout
        # The top five overall (the kernel's network and scheduler work included), then
        # the top five of the daemon's own user-space code and libraries.
        top, user = [], []
        for line in report.splitlines():
            m = re.match(r"\s+([0-9.]+)%\s+(\S+)\s+\[([.k])\]\s+(.*)", line)
            if not m:
                continue
            symbol = re.sub(r"\s+-\s+-\s*$", "", m.group(4)).strip()  # drop the IPC columns
            entry = (float(m.group(1)), m.group(2), symbol[:90])
            if len(top) < 5:
                top.append(entry)
            if m.group(3) == "." and len(user) < 5:
                user.append(entry)
            if len(top) == 5 and len(user) == 5:
                break
        profiles[label] = top + [e for e in user if e not in top]
        os.remove(data)

    t = threading.Thread(target=record)
    t.start()
    return t


def duration_secs(text):
    """Seconds of a Rust `Duration` as `{:?}` prints it: 3.3s, 12.5ms, 318.3µs, 40ns."""
    m = re.fullmatch(r"([0-9.]+)(s|ms|µs|ns)", text)
    if not m:
        h.fail(f"not a duration: {text!r}")
    return float(m.group(1)) / {"s": 1, "ms": 1e3, "µs": 1e6, "ns": 1e9}[m.group(2)]


def batch_body(path, events, keys, fields):
    evs = [{"keyField": f"bk-{i % keys}",
            "values": {f"f{j}": f"{i:016d}{j:016d}" for j in range(fields)}} for i in range(events)]
    with open(path, "w") as f:
        json.dump({"events": evs}, f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    a = p.parse_args()
    q = a.quick
    secs = 3 if q else 10
    big = 20_000 if q else 1_000_000
    working_set = 5_000 if q else 100_000
    profiles = None if (a.no_profile or q) else {}

    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "keyexportd", "--examples"],
                   cwd=ROOT, check=True)
    daemon_bin = os.path.join(RELEASE, "keyexportd")
    loadgen = os.path.join(RELEASE, "examples", "loadgen")
    ceilings = os.path.join(RELEASE, "examples", "bench_ceilings")
    info = machine(a.out)
    rows = []

    def row(figure, value, unit, ceiling, goal, better="ratio", note=""):
        """better: "ratio" (value/ceiling >= goal), "max" (value <= goal), "min" (value >= goal)."""
        ratio = value / ceiling if ceiling else None
        if better == "ratio":
            met = ratio is not None and ratio >= goal
            goal_text = f">= {goal:.0%} of ceiling"
        elif better == "max":
            met = value <= goal
            goal_text = f"<= {goal:,} {unit}"
        else:
            met = value >= goal
            goal_text = f">= {goal:,} {unit}"
        rows.append({"figure": figure, "value": round(value, 1), "unit": unit,
                     "ceiling": None if ceiling is None else round(ceiling, 1),
                     "ratio": None if ratio is None else round(ratio, 3),
                     "goal": goal_text, "met": met, "note": note})
        print(json.dumps(rows[-1]), flush=True)

    # --- HTTP ceiling -------------------------------------------------------------------
    port = h.free_port()
    ceiling = subprocess.Popen([os.path.join(RELEASE, "examples", "ceiling_server"), f"127.0.0.1:{port}"],
                               stderr=subprocess.DEVNULL)
    h.wait_port(port)
    curl = f"http://127.0.0.1:{port}/v1/streams/s/keys"
    wrk(curl, "new_keys.lua", ["t", "warm"], 64, 2)
    ceil_new = wrk(curl, "new_keys.lua", ["t", "c"], 64, secs)
    ceil_existing = wrk(curl, "existing_keys.lua", ["t", "ws", str(working_set)], 64, secs)
    ceiling.kill()
    ceiling.wait()

    # --- figures 1-3: a fresh daemon -------------------------------------------------------
    work = h.workdir("bench")
    small_work = work
    d = h.Daemon(daemon_bin, work, {})
    d.start()
    d.ok("POST", "/v1/streams", {"name": "s"})
    url = d.base + "/v1/streams/s/keys"
    wrk(url, "new_keys.lua", [d.token, "warm"], 64, 2)
    prof = profile(d.pid(), min(5, secs), "1. new keys", profiles)
    new = wrk(url, "new_keys.lua", [d.token, "n"], 64, secs)
    prof and prof.join()
    created = h.metric(d.metrics(), "keyexportd_keys_created_total")
    row("1. durable get-or-create, new keys (HTTP, 64 connections)", new["perSecond"], "req/s",
        ceil_new["perSecond"], 0.5,
        note=f"p99 {new['p99Ms']} ms; {new['requests']} answered, {int(created)} keys created in all, "
             f"{new['non2xx']} errors; every answer waited for its fsync")

    run_json([loadgen, "--base", d.base, "--token-file", os.path.join(d.data_dir, "admin.token"),
              "--stream", "s", "--count", str(working_set), "--seconds", "900", "--connections", "64",
              "--prefix", "ws"])
    prof = profile(d.pid(), min(5, secs), "2. existing keys", profiles)
    existing = wrk(url, "existing_keys.lua", [d.token, "ws", str(working_set)], 64, secs)
    prof and prof.join()
    row(f"2. get-or-create, existing keys ({working_set:,} working set)", existing["perSecond"], "req/s",
        ceil_existing["perSecond"], 0.7, note=f"p99 {existing['p99Ms']} ms; {existing['non2xx']} errors")

    body = os.path.join(work, "batch.json")
    batch_body(body, 1000, 100, 3)
    enc_url = d.base + "/v1/streams/s/encrypt"
    wrk(enc_url, "fixed_body.lua", [d.token, body], 4, 2)
    prof = profile(d.pid(), min(5, secs), "3. batch encryption", profiles)
    batch = wrk(enc_url, "fixed_body.lua", [d.token, body], 4, secs)
    prof and prof.join()
    daead = max((run_json([ceilings, "daead", "100", "1000", "3", str(min(secs, 5))]) for _ in range(2)),
                key=lambda r: r["fieldsPerSecond"])
    row("3. batch encryption (1,000 events x 3 fields of 32 B)", batch["perSecond"] * 3000, "fields/s",
        daead["fieldsPerSecond"], 0.3,
        note=f"{batch['perSecond']} requests/s, p99 {batch['p99Ms']} ms; ceiling: one in-process "
             f"thread of tink-daead encrypt_deterministically")
    d.stop()

    # --- figures 4-7: a daemon with a million keys ------------------------------------------
    moto = h.Moto()
    moto.start()
    moto.create_bucket("bench-export")
    moto.create_bucket("bench-ceiling")
    work = h.workdir("bench-big")
    # The janitor's first round comes one purge interval after a start: 5 s leaves the
    # purge of figure 7 clear of the restart's own warm-up.
    # (The janitor logs the time of its purges at debug: figure 7 reads them.)
    d = h.Daemon(daemon_bin, work, {"keys": 'grace = "1s"\npurge_interval = "5s"',
                                    "log": 'level = "info,keyexportd::keys=debug"'})
    d.start()
    d.ok("POST", "/v1/streams", {"name": "big"})
    token_file = os.path.join(d.data_dir, "admin.token")
    started = time.time()
    fill = run_json([loadgen, "--base", d.base, "--token-file", token_file, "--stream", "big",
                     "--count", str(big), "--seconds", "3600", "--connections", "64", "--prefix", "big"])
    fill_secs = time.time() - started
    print(json.dumps({"filled": big, "seconds": round(fill_secs, 1), "perSecond": fill["perSecond"]}), flush=True)

    # 5. memory under load with the keys live
    sampler = Sampler(d.pid())
    under_load = wrk(d.base + "/v1/streams/big/keys", "existing_keys.lua", [d.token, "big", str(big)], 64, secs)
    rss = sampler.done()
    row(f"5. resident memory, {big:,} live keys under load", rss, "MB", None, 100, better="max",
        note=f"storage.cache_capacity_mb = 64; {under_load['perSecond']} req/s on existing keys meanwhile")

    # 6. restart to ready
    d.stop()
    t0 = time.time()
    d.start()
    ready = time.time() - t0
    row(f"6. restart to ready, {big:,} keys", ready, "s", None, 2, better="max",
        note="from exec to the first 200 of GET /readyz")

    # 4. export of the million waiting keys
    d.ok("POST", "/v1/sinks", {"name": "s3", "sinkType": "S3", "bucket": {
        "bucketName": "bench-export", "endpoint": moto.endpoint, "pathStyle": True,
        "credentials": {"accessKeyId": "test", "secretAccessKey": "test"}}})
    for name, sink in (("local", "local"), ("s3", "s3")):
        d.ok("POST", "/v1/batch-exporters", {"name": name, "keyStreamRef": {"name": "big"}, "sinkName": sink,
             "interval": 3600, "pathPrefix": f"bench-{name}"})
    idle = run_json([loadgen, "--base", d.base, "--token-file", token_file, "--stream", "big", "--rate", "200",
                     "--seconds", str(secs), "--prefix", "idle"])
    export_dir = os.path.join(d.data_dir, "export", "bench-local")
    for name in ("local", "s3"):
        load = h.Load(loadgen, d, "big", 200, 3600, os.devnull, prefix=f"during-{name}", stoppable=True)
        prof = profile(d.pid(), min(5, secs), f"4. export ({name})", profiles)
        t0 = time.time()
        status, _ = d.request("POST", f"/v1/batch-exporters/{name}/flush", timeout=3600)
        took = time.time() - t0
        during = load.stop()
        prof and prof.join()
        if status != 200:
            h.fail(f"flush {name}: {status}")
        size = sum(os.path.getsize(os.path.join(export_dir, f)) for f in os.listdir(export_dir)
                   if not f.startswith(".strm_test_"))
        durable = ""
        if name == "local":
            target = os.path.join(work, "ceiling-local")
            ceil = max((run_json([ceilings, "put", export_dir, "local", target]) for _ in range(2)),
                       key=lambda r: r["bytesPerSecond"])
            # The daemon syncs every local object before its cursor moves: the same bytes
            # written by object_store with fsync are the like-for-like reference.
            synced = run_json([ceilings, "put", export_dir, "local-fsync", target + "-fsync"])
            durable = (f"; with fsync object_store writes {synced['bytesPerSecond'] / 1e6:,.1f} MB/s, the "
                       f"daemon {size / took / synced['bytesPerSecond']:.0%} of that")
        else:
            ceil = run_json([ceilings, "put", export_dir, "s3", moto.endpoint, "bench-ceiling"])
        row(f"4. export of {big:,} waiting keys, one flush, {name} sink", size / took / 1e6, "MB/s",
            ceil["bytesPerSecond"] / 1e6, 0.5,
            note=f"{took:.1f} s, {big / took:,.0f} keys/s, {size / 1e6:.0f} MB; ceiling: the same bytes "
                 f"written with object_store directly{durable}")
        row(f"4. p99 of key creation during the {name} export (200/s)", during["p99Ms"], "ms", None,
            round(2 * idle["p99Ms"], 3), better="max",
            note=f"idle p99 {idle['p99Ms']} ms (goal: at most twice that); {during['ok']} keys created "
                 f"while the flush ran")

    # 7. purge of a million keys expiring at once. The rotation outlasts the fill (so no
    # key expires, and none is purged, before the daemon stops), then the daemon stays
    # down until every key has expired and every key of the stream's rotation periods has
    # rotated: at the restart all of them are due at once, their purge and the drop of
    # their current-key pointers (one table per rotation period).
    rotation = int(fill_secs * 1.5) + (10 if q else 30)
    d.ok("POST", "/v1/streams", {"name": "short", "keyRotation": f"{rotation}s"})
    run_json([loadgen, "--base", d.base, "--token-file", token_file, "--stream", "short", "--count", str(big),
              "--seconds", "3600", "--connections", "64", "--prefix", "short"])
    filled_at = time.time()
    m = d.metrics()
    purged_before_stop = h.metric(m, "keyexportd_keys_purged_total") or 0
    if purged_before_stop:
        h.fail(f"{purged_before_stop:.0f} keys of the purge figure expired before the daemon stopped")
    tables = h.metric(m, 'keyexportd_current_key_tables{stream="short"}') or 0
    if not tables:
        h.fail("the purge figure's stream holds no current-key pointer table")
    d.stop()
    # The last key was created at filled_at: it has expired after rotation + grace (1 s),
    # and its period [start, start + rotation) with start <= filled_at has rotated by
    # start + 2 * rotation.
    period_start = (int(filled_at) // rotation) * rotation
    due = max(filled_at + rotation + 1, period_start + 2 * rotation)
    time.sleep(max(0.0, due - time.time()) + 2)
    log_from = os.path.getsize(d.log_path)
    d.start()
    t_start = time.time()
    # The first seconds after a restart are slow in their own right (cold caches: a p99
    # of tens of ms with nothing to purge); the first janitor round comes 5 s after the
    # start, and the measured load begins after 3 s of warm-up load.
    warm = h.Load(loadgen, d, "big", 200, 3600, os.devnull, prefix="warm", stoppable=True)
    time.sleep(3)
    warmup = warm.stop()
    load = h.Load(loadgen, d, "big", 200, 3600, os.devnull, prefix="purge", stoppable=True)
    prof = profile(d.pid(), min(5, secs), "7. purge", profiles)
    purged, left = 0, tables
    while time.time() - t_start < 600:
        m = d.metrics()
        purged = h.metric(m, "keyexportd_keys_purged_total") or 0
        left = h.metric(m, 'keyexportd_current_key_tables{stream="short"}')
        if purged >= big and left == 0:
            break
        time.sleep(0.05)
    done_secs = time.time() - t_start
    time.sleep(1)  # the round's tail (sled's deferred frees) stays inside the window
    during = load.stop()
    prof and prof.join()
    if purged < big or left != 0:
        h.fail(f"only {purged:.0f} of {big} expired keys were purged ({left} pointer tables left) "
               f"in {done_secs:.0f} s")
    # The janitor logs what its round took: dropping the tables, then the purge itself.
    with open(d.log_path, encoding="utf-8", errors="replace") as f:
        f.seek(log_from)
        took = [duration_secs(m.group(1)) for m in re.finditer(
            r"janitor: (?:dropped the current-key pointers of \d+ rotated period\(s\)|"
            r"purged \d+ expired key\(s\) of key stream \S+) in (\S+)", f.read())]
    if len(took) < 2:
        h.fail(f"the janitor logged {len(took)} of the drop and the purge of its round")
    round_secs = sum(took)
    idle = run_json([loadgen, "--base", d.base, "--token-file", token_file, "--stream", "big", "--rate", "200",
                     "--seconds", str(secs), "--prefix", "idle2"])
    row(f"7. purge of {big:,} keys expiring at once", purged / round_secs, "keys/s", None, 100_000,
        better="min",
        note=f"{int(purged):,} purged and their {tables:.0f} current-key pointer table(s) dropped in one "
             f"janitor round of {round_secs:.2f} s (as the daemon logs it; done {done_secs:.1f} s after "
             f"the start, the first round 5 s after it)")
    row("7. p99 of key creation during the purge (200/s)", during["p99Ms"], "ms", None,
        round(2 * idle["p99Ms"], 3), better="max",
        note=f"idle p99 {idle['p99Ms']} ms; {during['ok']} keys created from 2 s before the round to "
             f"1 s after it; the 3 s of warm-up after the restart before them: p99 {warmup['p99Ms']} ms")
    d.stop()
    moto.stop()

    # A full run leaves some 5 GB of data directories; a failed run keeps them to look at.
    for directory in (small_work, work):
        shutil.rmtree(directory, ignore_errors=True)
    write_report(a.out, info, rows, profiles, q)


def write_report(path, info, rows, profiles, quick):
    lines = [
        "<!-- figures:begin (written by scripts/bench.sh; edit outside the markers) -->",
        f"Run: `scripts/bench.sh{' --quick' if quick else ''}` on {info['date']}, commit `{info['commit']}`, "
        f"{info['cores']} cores ({info['cpu']}).",
        "",
        "| figure | value | ceiling | ratio | goal | met | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ceiling = "" if r["ceiling"] is None else f"{r['ceiling']:,} {r['unit']}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.0%}"
        lines.append(f"| {r['figure']} | {r['value']:,} {r['unit']} | {ceiling} | {ratio} | {r['goal']} | "
                     f"{'yes' if r['met'] else '**no**'} | {r['note']} |")
    lines.append("<!-- figures:end -->")
    figures = "\n".join(lines)
    prof_lines = ["<!-- profiles:begin (written by scripts/bench.sh) -->"]
    if profiles:
        for label, top in profiles.items():
            prof_lines.append(f"**{label}** (perf, cpu-clock, self time; the top five, then the top "
                              f"five user-space symbols):")
            prof_lines.append("")
            for pct, dso, sym in top:
                prof_lines.append(f"- {pct:.1f}% `{sym}` ({dso})")
            prof_lines.append("")
    else:
        prof_lines.append("(profiles not taken in this run)")
    prof_lines.append("<!-- profiles:end -->")
    profiles_text = "\n".join(prof_lines)
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n" + figures + "\n\n" + profiles_text + "\n"
    text = re.sub(r"<!-- figures:begin.*?<!-- figures:end -->", lambda _: figures, text, flags=re.S)
    if profiles or "<!-- profiles:begin" not in text:
        text = re.sub(r"<!-- profiles:begin.*?<!-- profiles:end -->", lambda _: profiles_text, text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
