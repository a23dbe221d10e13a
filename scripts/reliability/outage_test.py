#!/usr/bin/env python3
"""Outage test: the S3 server goes down while keys keep being created, then comes back.
Every key must be exported exactly once, within two intervals after the server
returns; during the outage status.lastError and the upload-failure metric must show it,
and the daemon must keep answering.

usage: outage_test.py [--outage 120] [--interval 10] [--rate 100] [--profile release]"""

import argparse
import os
import time

import harness as h


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--outage", type=float, default=120, help="seconds the S3 server is down")
    p.add_argument("--interval", type=int, default=10, help="exporter interval in seconds")
    p.add_argument("--rate", type=int, default=100)
    p.add_argument("--profile", default="release")
    p.add_argument("--out")
    a = p.parse_args()

    daemon_bin, loadgen = h.build(a.profile)
    work = h.workdir("outage")
    moto = h.Moto()
    moto.start()
    moto.create_bucket("outage-test")
    d = h.Daemon(daemon_bin, work, {})
    d.start()
    d.ok("POST", "/v1/streams", {"name": "s"})
    d.ok("POST", "/v1/sinks", {"name": "s3", "sinkType": "S3", "bucket": {
        "bucketName": "outage-test", "endpoint": moto.endpoint, "pathStyle": True,
        "credentials": {"accessKeyId": "test", "secretAccessKey": "test"}}})
    d.ok("POST", "/v1/batch-exporters", {"name": "e", "keyStreamRef": {"name": "s"},
         "sinkName": "s3", "interval": a.interval, "pathPrefix": "outage"})

    answered_path = os.path.join(work, "answered.txt")
    before = a.interval + 2
    load = h.Load(loadgen, d, "s", a.rate, int(before + a.outage), answered_path)
    time.sleep(before)
    # moto keeps objects in memory only: keep what it holds before it goes down.
    objects = moto.dump("outage-test")
    moto.stop()
    down_at = time.time()
    saw_error, failures, answered_during = None, 0, 0
    while time.time() - down_at < a.outage:
        time.sleep(min(5, a.outage / 4))
        st = d.ok("GET", "/v1/batch-exporters/e")["batchExporter"]["status"]
        saw_error = saw_error or st["lastError"]
        failures = h.metric(d.metrics(), 'keyexportd_exporter_upload_failures_total{exporter="e"}') or 0
    summary = load.wait()
    answered = h.read_lines(answered_path)
    moto.start()
    moto.create_bucket("outage-test")
    back_at = time.time()
    total = None
    while time.time() - back_at < 4 * a.interval + 30:
        st = d.ok("GET", "/v1/batch-exporters/e")["batchExporter"]["status"]
        if st["pendingKeys"] == 0 and st["lastError"] is None:
            total = time.time() - back_at
            break
        time.sleep(0.2)
    objects += moto.dump("outage-test")
    seen = h.links_by_object(objects)
    status = d.ok("GET", "/v1/batch-exporters/e")["batchExporter"]["status"]
    result = {
        "test": "outage",
        "profile": a.profile,
        "outageSeconds": a.outage,
        "intervalSeconds": a.interval,
        "answered": len(answered),
        "loadFailures": summary["failed"],
        "lastErrorDuringOutage": saw_error,
        "uploadFailuresDuringOutage": failures,
        "secondsToCatchUpAfterReturn": None if total is None else round(total, 1),
        "exported": len(seen),
        "missingAnswered": sum(1 for l in answered if l not in seen),
        "twice": sum(1 for objs in seen.values() if len(objs) > 1),
        "exportedKeysStatus": status["exportedKeys"],
    }
    d.stop()
    moto.stop()
    h.report(result, a.out)
    problems = []
    if not saw_error or "unreachable" not in saw_error:
        problems.append("status.lastError did not show the outage")
    if failures < 1:
        problems.append("the upload-failure metric did not move")
    if summary["failed"]:
        problems.append("key creations failed during the outage")
    if total is None or total > 2 * a.interval:
        problems.append("not caught up within two intervals")
    if result["missingAnswered"] or result["twice"]:
        problems.append("a key missing or exported twice")
    if problems:
        h.fail("; ".join(problems))
    print("PASS")


if __name__ == "__main__":
    main()
