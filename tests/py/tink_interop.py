"""Loads exported keysets with Python Tink and decrypts / re-encrypts the daemon's
ciphertexts. Input on stdin:
  {"keys":[{"keyLink":..,"tinkKey":{..},"cases":[{"plaintext":..,"ciphertext":<b64>}]}]}
Output on stdout: {"keys":[{"keyLink":..,"decrypted":[..],"reencrypted":[<b64>..]}]}
The Rust test compares; this script only uses PyPI `tink` and the exported JSON."""

import base64
import json
import sys

import tink
from tink import daead, secret_key_access

daead.register()


def main():
    request = json.load(sys.stdin)
    out = []
    for key in request["keys"]:
        handle = tink.json_proto_keyset_format.parse(
            json.dumps(key["tinkKey"]), secret_key_access.TOKEN
        )
        primitive = handle.primitive(daead.DeterministicAead)
        decrypted, reencrypted = [], []
        for case in key["cases"]:
            ct = base64.b64decode(case["ciphertext"], validate=True)
            decrypted.append(primitive.decrypt_deterministically(ct, b"").decode("utf-8"))
            again = primitive.encrypt_deterministically(case["plaintext"].encode("utf-8"), b"")
            reencrypted.append(base64.b64encode(again).decode("ascii"))
        out.append({"keyLink": key["keyLink"], "decrypted": decrypted, "reencrypted": reencrypted})
    json.dump({"keys": out}, sys.stdout)


if __name__ == "__main__":
    main()
