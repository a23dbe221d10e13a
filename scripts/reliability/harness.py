"""Shared pieces of the reliability scripts: the real daemon binary, moto's S3 server,
the load generator, and readers of what was exported.

Only the standard library and boto3 (tests/py/requirements.txt) are needed."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, up=True, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            if up:
                return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not come {'up' if up else 'down'}")


def build(profile):
    """Builds the daemon and the load generator; returns (daemon, loadgen) paths."""
    flag = ["--release"] if profile == "release" else []
    subprocess.run(["cargo", "build", "--quiet", *flag, "--bin", "keyexportd", "--example", "loadgen"],
                   cwd=ROOT, check=True)
    target = os.path.join(ROOT, "target", profile)
    return os.path.join(target, "keyexportd"), os.path.join(target, "examples", "loadgen")


class Daemon:
    def __init__(self, binary, root, config, data_dir=None):
        self.binary = binary
        self.root = root
        self.port = free_port()
        self.data_dir = data_dir or os.path.join(root, "data")
        self.config_path = os.path.join(root, "keyexportd.toml")
        self.log_path = os.path.join(root, "daemon.log")
        base = {
            "server": f'listen = "127.0.0.1:{self.port}"',
            "storage": f'data_dir = "{self.data_dir}"',
            "account": "key_export_allowed = true",
            "export": 'min_interval = "1s"',
        }
        for section, lines in config.items():
            base[section] = (base.get(section, "") + "\n" + lines).strip()
        with open(self.config_path, "w") as f:
            for section, lines in base.items():
                f.write(f"[{section}]\n{lines}\n")
        self.proc = None
        self.token = None

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([self.binary, "serve", "--config", self.config_path],
                                     stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.request("GET", "/readyz", auth=False)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.02)
        else:
            raise RuntimeError("daemon did not become ready")
        with open(os.path.join(self.data_dir, "admin.token")) as f:
            self.token = f.read().strip()

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def log_tail(self, n=20):
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def request(self, method, path, body=None, auth=True, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode()
                return r.status, (json.loads(text) if text.startswith(("{", "[")) else text)
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, text

    def ok(self, method, path, body=None):
        status, value = self.request(method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {value}")
        return value

    def metrics(self):
        return self.request("GET", "/metrics")[1]

    def pid(self):
        return self.proc.pid


def metric(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


class Moto:
    def __init__(self):
        self.port = free_port()
        self.proc = None

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        exe = shutil.which("moto_server")
        if exe is None:
            raise RuntimeError("moto_server not found: pip install -r tests/py/requirements.txt")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        wait_port(self.port, up=False)

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test",
                            config=Config(s3={"addressing_style": "path"}))

    def create_bucket(self, name):
        self.client().create_bucket(Bucket=name)

    def dump(self, bucket):
        """[(key, text)] of every object."""
        s3 = self.client()
        out = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read().decode()
                out.append((o["Key"], body))
        return out


def local_objects(directory):
    out = []
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path) as f:
                out.append((os.path.relpath(path, directory), f.read()))
    return out


def links_by_object(objects):
    """keyLink -> [object names], over exported JSON Lines objects."""
    seen = {}
    for name, body in objects:
        if not name.endswith(".jsonl") or "/.strm_test_" in "/" + name:
            continue
        for line in body.splitlines():
            link = json.loads(line)["keyLink"]
            seen.setdefault(link, []).append(name)
    return seen


class Load:
    """The load generator in the background, writing answered keyLinks to a file."""

    def __init__(self, loadgen, daemon, stream, rate, seconds, out, connections=16, prefix=None,
                 stoppable=False):
        token_file = os.path.join(daemon.data_dir, "admin.token")
        args = [loadgen, "--base", daemon.base, "--token-file", token_file, "--stream", stream,
                "--rate", str(rate), "--seconds", str(seconds), "--out", out,
                "--connections", str(connections)]
        if prefix:
            args += ["--prefix", prefix]
        # With stoppable, the load runs until stop() (at most `seconds`).
        self.stop_file = None
        if stoppable:
            fd, self.stop_file = tempfile.mkstemp(prefix="loadgen-stop-")
            os.close(fd)
            os.remove(self.stop_file)
            args += ["--stop-file", self.stop_file]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)

    def stop(self):
        """Ends a stoppable load now and returns its summary."""
        open(self.stop_file, "w").close()
        try:
            return self.wait()
        finally:
            os.remove(self.stop_file)

    def wait(self):
        out, _ = self.proc.communicate()
        return json.loads(out.strip().splitlines()[-1])


def read_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [l.strip() for l in f if l.strip()]


def check_served(daemon, links):
    """Every keyLink answers 200 on GET /v1/keys/{keyLink}; returns the missing ones."""
    missing = []
    for link in links:
        status, _ = daemon.request("GET", f"/v1/keys/{link}")
        if status != 200:
            missing.append((link, status))
    return missing


def workdir(name):
    return tempfile.mkdtemp(prefix=f"keyexportd-{name}-")


def report(result, path=None):
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def pause(lo, hi):
    time.sleep(random.uniform(lo, hi))
