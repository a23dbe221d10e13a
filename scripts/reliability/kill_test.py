#!/usr/bin/env python3
"""Kill test: rounds of `kill -9` at random moments under a load of key creations, with
a local and an S3 exporter running. Afterwards every acknowledged keyLink must still be
served, and every key must be in exactly one object of each exporter.

usage: kill_test.py [--rounds 20] [--rate 300] [--profile release|debug] [--out FILE]"""

import argparse
import os
import time

import harness as h


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--rate", type=int, default=300, help="key creations per second")
    p.add_argument("--profile", default="release")
    p.add_argument("--out")
    a = p.parse_args()

    daemon_bin, loadgen = h.build(a.profile)
    work = h.workdir("kill")
    moto = h.Moto()
    moto.start()
    moto.create_bucket("kill-test")
    d = h.Daemon(daemon_bin, work, {})
    d.start()
    d.ok("POST", "/v1/streams", {"name": "s"})
    d.ok("POST", "/v1/sinks", {"name": "s3", "sinkType": "S3", "bucket": {
        "bucketName": "kill-test", "endpoint": moto.endpoint, "pathStyle": True,
        "credentials": {"accessKeyId": "test", "secretAccessKey": "test"}}})
    for sink in ("local", "s3"):
        d.ok("POST", "/v1/batch-exporters", {"name": sink, "keyStreamRef": {"name": "s"},
             "sinkName": sink, "interval": "1s", "pathPrefix": "kill"})

    answered_path = os.path.join(work, "answered.txt")
    seconds = a.rounds * 3 + 5
    load = h.Load(loadgen, d, "s", a.rate, seconds, answered_path)
    started = time.time()
    kills = []
    for r in range(a.rounds):
        h.pause(0.5, 2.5)
        before = len(h.read_lines(answered_path))
        d.kill9()
        kills.append(before)
        d.start()
        print(f"round {r + 1}/{a.rounds}: killed after {before} answered keys", flush=True)
    summary = load.wait()
    answered = h.read_lines(answered_path)

    # Let the exporters catch up, then check.
    for name in ("local", "s3"):
        d.ok("POST", f"/v1/batch-exporters/{name}/flush")
        st = d.ok("GET", f"/v1/batch-exporters/{name}")["batchExporter"]["status"]
        if st["pendingKeys"] != 0:
            h.fail(f"{name}: {st['pendingKeys']} keys still pending after a flush")
    missing_served = h.check_served(d, answered)
    exports = {
        "local": h.links_by_object(h.local_objects(os.path.join(d.data_dir, "export"))),
        "s3": h.links_by_object(moto.dump("kill-test")),
    }
    result = {
        "test": "kill",
        "profile": a.profile,
        "rounds": a.rounds,
        "rateTarget": a.rate,
        "seconds": round(time.time() - started, 1),
        "answered": len(answered),
        "loadFailures": summary["failed"],
        "answeredNotServed": len(missing_served),
    }
    for name, seen in exports.items():
        result[f"{name}Exported"] = len(seen)
        result[f"{name}MissingAnswered"] = sum(1 for l in answered if l not in seen)
        result[f"{name}Twice"] = sum(1 for objs in seen.values() if len(objs) > 1)
    d.stop()
    moto.stop()
    h.report(result, a.out)
    problems = [k for k in ("answeredNotServed", "localMissingAnswered", "localTwice",
                            "s3MissingAnswered", "s3Twice") if result[k]]
    if problems or not answered:
        h.fail(f"kill test: {problems or 'no key was answered'}")
    print("PASS")


if __name__ == "__main__":
    main()
