#!/usr/bin/env python3
"""Disk-full test (needs root to mount a tmpfs with a size limit): the data directory
sits on a small file system that is filled up under load. Writes must get 503 while it
is full (reads keep working, readiness fails), nothing may be corrupted, and service
must resume by itself once space is freed.

usage: disk_full_test.py [--size-mb 160] [--full-seconds 10] [--profile release]"""

import argparse
import os
import subprocess
import time

import harness as h


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size-mb", type=int, default=160)
    p.add_argument("--full-seconds", type=float, default=10)
    p.add_argument("--rate", type=int, default=100)
    p.add_argument("--profile", default="release")
    p.add_argument("--out")
    a = p.parse_args()
    if os.geteuid() != 0:
        h.fail("the disk-full test mounts a tmpfs and needs root")

    daemon_bin, loadgen = h.build(a.profile)
    work = h.workdir("diskfull")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.size_mb}m", "tmpfs", mnt], check=True)
    try:
        result = run(a, daemon_bin, loadgen, work, mnt)
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
    h.report(result, a.out)
    if result["problems"]:
        h.fail("; ".join(result["problems"]))
    print("PASS")


def run(a, daemon_bin, loadgen, work, mnt):
    d = h.Daemon(daemon_bin, work, {"storage": "min_free_mb = 64"}, data_dir=os.path.join(mnt, "data"))
    d.start()
    d.ok("POST", "/v1/streams", {"name": "s"})
    d.ok("POST", "/v1/batch-exporters", {"name": "e", "keyStreamRef": {"name": "s"},
         "sinkName": "local", "interval": 1, "pathPrefix": "full"})
    answered_path = os.path.join(work, "answered.txt")
    load = h.Load(loadgen, d, "s", a.rate, 4, answered_path, prefix="before")
    load.wait()
    known = d.ok("POST", "/v1/streams/s/keys", {"keyField": "known"})["keyLink"]

    # Fill the disk to 32 MiB below the 64 MiB reserve.
    st = os.statvfs(mnt)
    filler = os.path.join(mnt, "filler")
    subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - (32 << 20)), filler], check=True)
    time.sleep(0.3)
    statuses = {}
    for i in range(int(a.full_seconds * 10)):
        s, body = d.request("POST", "/v1/streams/s/keys", {"keyField": f"during-{i}"})
        statuses[s] = statuses.get(s, 0) + 1
        time.sleep(0.1)
    ready_while_full = d.request("GET", "/readyz", auth=False)[0]
    known_while_full = d.request("POST", "/v1/streams/s/keys", {"keyField": "known"})
    export_error = d.ok("GET", "/v1/batch-exporters/e")["batchExporter"]["status"]["lastError"]

    os.remove(filler)
    time.sleep(0.3)
    resumed = d.request("POST", "/v1/streams/s/keys", {"keyField": "after"})[0]
    ready_after = d.request("GET", "/readyz", auth=False)[0]
    load = h.Load(loadgen, d, "s", a.rate, 3, answered_path, prefix="after")
    after = load.wait()
    d.ok("POST", "/v1/batch-exporters/e/flush")
    # No corruption: a restart serves every answered key, and the export holds them once.
    stopped = d.stop()
    d.start()
    answered = h.read_lines(answered_path) + [known]
    not_served = h.check_served(d, answered)
    seen = h.links_by_object(h.local_objects(os.path.join(d.data_dir, "export")))
    d.ok("POST", "/v1/batch-exporters/e/flush")
    seen = h.links_by_object(h.local_objects(os.path.join(d.data_dir, "export")))
    d.stop()
    problems = []
    if statuses.get(200):
        problems.append(f"{statuses[200]} new keys answered 200 while full")
    if set(statuses) != {503}:
        problems.append(f"statuses while full: {statuses}")
    if ready_while_full != 503:
        problems.append("readiness did not fail while full")
    if known_while_full[0] != 200 or known_while_full[1]["keyLink"] != known:
        problems.append("an existing key was not served while full")
    if resumed != 200 or ready_after != 200 or after["failed"]:
        problems.append("service did not resume after space was freed")
    if stopped != 0:
        problems.append(f"SIGTERM exit code {stopped}")
    if not_served:
        problems.append(f"{len(not_served)} answered keys not served after restart")
    missing = [l for l in answered if l not in seen]
    twice = [l for l, objs in seen.items() if len(objs) > 1]
    if missing or twice:
        problems.append(f"export: {len(missing)} missing, {len(twice)} twice")
    return {
        "test": "disk-full",
        "profile": a.profile,
        "fsSizeMb": a.size_mb,
        "statusesWhileFull": statuses,
        "readyzWhileFull": ready_while_full,
        "exporterErrorWhileFull": export_error,
        "resumedStatus": resumed,
        "answered": len(answered),
        "exported": len(seen),
        "problems": problems,
    }


if __name__ == "__main__":
    main()
