"""A real S3 client (boto3) for the tests: creates buckets and reads them back.

usage: s3tool.py ENDPOINT create-bucket BUCKET
       s3tool.py ENDPOINT create-user USER -> {"accessKeyId":..,"secretAccessKey":..}
       s3tool.py ENDPOINT dump BUCKET      -> {"objects":[{"key":..,"size":..,"body":..}]}
Bodies are returned as UTF-8 text (exported objects are JSON Lines or CSV)."""

import json
import sys

import boto3
from botocore.config import Config


def client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test-access-key",
        aws_secret_access_key="test-secret-key",
        config=Config(s3={"addressing_style": "path"}),
    )


def main():
    endpoint, command, bucket = sys.argv[1:4]
    s3 = client(endpoint)
    if command == "create-bucket":
        s3.create_bucket(Bucket=bucket)
        print(json.dumps({"created": bucket}))
    elif command == "dump":
        objects = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                objects.append({"key": o["Key"], "size": o["Size"], "body": body.decode("utf-8")})
        print(json.dumps({"objects": objects}))
    elif command == "create-user":
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="test-access-key",
                           aws_secret_access_key="test-secret-key")
        iam.create_user(UserName=bucket)
        key = iam.create_access_key(UserName=bucket)["AccessKey"]
        print(json.dumps({"accessKeyId": key["AccessKeyId"],
                          "secretAccessKey": key["SecretAccessKey"]}))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
