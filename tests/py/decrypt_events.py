"""Decrypts JSON Lines events with exported key files, using only PyPI `tink` and the
standard library: the data owner's path of docs/consuming-keys.md.

usage: decrypt_events.py KEYS_DIR KEYLINK_FIELD FIELD... < events.jsonl > plain.jsonl
Fields and the keyLink field are dotted paths (strmMeta.keyLink, user.email)."""

import base64
import csv
import json
import os
import sys

import tink
from tink import daead, secret_key_access

daead.register()


def load_keys(directory):
    """keyLink -> DeterministicAead, from every exported .jsonl and .csv object."""
    keys = {}
    for dirpath, _, files in os.walk(directory):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            if name.startswith(".strm_test_"):
                continue
            if name.endswith(".jsonl"):
                with open(path) as f:
                    rows = [json.loads(line) for line in f if line.strip()]
                pairs = [(r["keyLink"], json.dumps(r["tinkKey"])) for r in rows]
            elif name.endswith(".csv"):
                with open(path, newline="") as f:
                    pairs = [(r["keyLink"], r["encryptionKey"]) for r in csv.DictReader(f)]
            else:
                continue
            for link, keyset in pairs:
                handle = tink.json_proto_keyset_format.parse(keyset, secret_key_access.TOKEN)
                keys[link] = handle.primitive(daead.DeterministicAead)
    return keys


def get(event, path):
    for part in path.split("."):
        if not isinstance(event, dict) or part not in event:
            return None
        event = event[part]
    return event


def main():
    keys_dir, link_field, fields = sys.argv[1], sys.argv[2], sys.argv[3:]
    keys = load_keys(keys_dir)
    for line in sys.stdin:
        event = json.loads(line)
        primitive = keys.get(get(event, link_field))
        if primitive is not None:
            for field in fields:
                *parents, last = field.split(".")
                holder = get(event, ".".join(parents)) if parents else event
                if isinstance(holder, dict) and isinstance(holder.get(last), str):
                    ciphertext = base64.b64decode(holder[last], validate=True)
                    # Empty associated data, as the daemon encrypts.
                    holder[last] = primitive.decrypt_deterministically(ciphertext, b"").decode("utf-8")
        sys.stdout.write(json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
