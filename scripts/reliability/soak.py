#!/usr/bin/env python3
"""Soak: a steady rate of key creations for a long time with several exporters (local
and S3). Samples the daemon's resident memory, open files and database size every few
seconds, plots them to a PNG (matplotlib) and fails on any error.

Keys rotate after a minute and are purged a minute later, and key streams keep five
minutes, so the database reaches a steady state after the warm-up.

usage: soak.py [--minutes 30] [--rate 1000] [--exporters 5] [--png soak.png]"""

import argparse
import json
import os
import time

import harness as h


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_files(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def dir_mb(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total / (1 << 20)


def plot(samples, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    series = [("rssMb", "resident memory (MiB)"), ("openFiles", "open files"),
              ("dbMb", "sled database (MiB)"), ("perSecond", "keys answered per second")]
    for ax, (key, label) in zip(axes, series):
        ax.plot(t, [s[key] for s in samples])
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def growth_problems(warm):
    """Flat after warm-up: the last third of the samples may not exceed the middle
    third's peak by more than 20% (or a small absolute slack for tiny values)."""
    if len(warm) < 6:
        return ["too few samples after warm-up to judge growth"]
    third = len(warm) // 3
    middle, last = warm[third:2 * third], warm[2 * third:]
    slack = {"rssMb": 10, "openFiles": 8, "dbMb": 16}
    out = []
    for key, extra in slack.items():
        peak = max(s[key] for s in middle)
        late = max(s[key] for s in last)
        if late > max(peak * 1.2, peak + extra):
            out.append(f"{key} grew after warm-up: {peak} -> {late}")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--exporters", type=int, default=5)
    p.add_argument("--interval", type=int, default=10, help="exporter interval (s)")
    p.add_argument("--sample", type=float, default=5, help="seconds between samples")
    p.add_argument("--profile", default="release")
    p.add_argument("--png", default="soak.png")
    p.add_argument("--out")
    a = p.parse_args()

    daemon_bin, loadgen = h.build(a.profile)
    work = h.workdir("soak")
    moto = h.Moto()
    moto.start()
    moto.create_bucket("soak")
    d = h.Daemon(daemon_bin, work, {
        "keys": 'rotation = "1m"\ngrace = "1m"\nstream_retention = "5m"',
    })
    d.start()
    d.ok("POST", "/v1/streams", {"name": "s"})
    d.ok("POST", "/v1/sinks", {"name": "s3", "sinkType": "S3", "bucket": {
        "bucketName": "soak", "endpoint": moto.endpoint, "pathStyle": True,
        "credentials": {"accessKeyId": "test", "secretAccessKey": "test"}}})
    for i in range(a.exporters):
        sink = "s3" if i % 2 else "local"
        d.ok("POST", "/v1/batch-exporters", {"name": f"e{i}", "keyStreamRef": {"name": "s"},
             "sinkName": sink, "interval": a.interval, "pathPrefix": f"soak/e{i}"})

    seconds = int(a.minutes * 60)
    answered_path = os.path.join(work, "answered.txt")
    load = h.Load(loadgen, d, "s", a.rate, seconds, answered_path, connections=32)
    started = time.time()
    samples = []
    last_count, last_t = 0, started
    db = os.path.join(d.data_dir, "db")
    while True:
        time.sleep(a.sample)
        if load.proc.poll() is not None:
            break
        now = time.time()
        count = sum(1 for _ in open(answered_path)) if os.path.exists(answered_path) else 0
        samples.append({
            "t": round(now - started, 1),
            "rssMb": round(rss_mb(d.pid()), 1),
            "openFiles": open_files(d.pid()),
            "dbMb": round(dir_mb(db), 1),
            "perSecond": round((count - last_count) / (now - last_t), 1),
        })
        last_count, last_t = count, now
        print(json.dumps(samples[-1]), flush=True)
    summary = load.wait()
    metrics = d.metrics()
    errors = {f"e{i}": h.metric(metrics, f'keyexportd_exporter_upload_failures_total{{exporter="e{i}"}}')
              for i in range(a.exporters)}
    created = h.metric(metrics, "keyexportd_keys_created_total") or 0
    pending, exported = {}, {}
    for i in range(a.exporters):
        d.ok("POST", f"/v1/batch-exporters/e{i}/flush")
        st = d.ok("GET", f"/v1/batch-exporters/e{i}")["batchExporter"]["status"]
        pending[f"e{i}"] = st["pendingKeys"]
        exported[f"e{i}"] = st["exportedKeys"]
    with open(d.log_path) as f:
        log_errors = [l for l in f if (" ERROR " in l or " WARN " in l)
                      and "generated a new master key" not in l]
    exit_code = d.stop()
    moto.stop()
    plot(samples, a.png, f"soak: {a.rate}/s for {a.minutes:g} min, {a.exporters} exporters ({a.profile})")
    warm = [s for s in samples if s["t"] >= min(600, seconds / 3)]
    result = {
        "test": "soak",
        "profile": a.profile,
        "minutes": a.minutes,
        "rateTarget": a.rate,
        "answered": summary["ok"],
        "failed": summary["failed"],
        "answeredPerSecond": round(summary["perSecond"], 1),
        "p99Ms": summary["p99Ms"],
        "keysCreated": created,
        "uploadFailures": errors,
        "pendingAfterFlush": pending,
        "exportedKeys": exported,
        "logWarningsOrErrors": len(log_errors),
        "exitCode": exit_code,
        "afterWarmUp": {
            key: {"min": min(s[key] for s in warm), "max": max(s[key] for s in warm)}
            for key in ("rssMb", "openFiles", "dbMb")
        } if warm else None,
        "png": a.png,
    }
    h.report(result, a.out)
    problems = []
    if summary["failed"]:
        problems.append(f"{summary['failed']} failed requests: {summary.get('failures')}")
    if any(errors.values()):
        problems.append(f"upload failures {errors}")
    if any(pending.values()):
        problems.append(f"pending keys after flush {pending}")
    if any(n != created for n in exported.values()):
        problems.append(f"exported keys {exported} differ from the {created:.0f} keys created")
    if summary["ok"] < 0.95 * a.rate * seconds:
        problems.append(f"only {summary['ok']} keys answered, below 95% of the target rate")
    problems += growth_problems(warm)
    if log_errors:
        problems.append(f"{len(log_errors)} warnings/errors in the log, first: {log_errors[0].strip()}")
    if exit_code != 0:
        problems.append(f"exit code {exit_code}")
    if problems:
        h.fail("; ".join(problems))
    print("PASS")


if __name__ == "__main__":
    main()
