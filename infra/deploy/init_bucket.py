"""Create the buckets and point the inbox's bucket events at MinIO's I2VFLOW webhook target.

Run once by docker-compose (service ``bucket-init``); safe to run again. The same as
``mc mb`` plus ``mc event add local/assets arn:minio:sqs::I2VFLOW:webhook --event put,delete
--prefix inbox/``, without needing the mc image.
"""

from __future__ import annotations

import os
import time

from minio.notificationconfig import NotificationConfig, PrefixFilterRule, QueueConfig

from infra.settings import Settings
from infra.store import s3_credentials
from infra.store.bucket import make_client


def main() -> None:
    settings = Settings()
    client = make_client(settings.s3_endpoint, *s3_credentials(settings), secure=settings.s3_secure,
                         region=settings.s3_region)
    for _attempt in range(60):  # MinIO may still be starting
        try:
            client.list_buckets()
            break
        except Exception:  # noqa: BLE001 - keep trying for a minute
            time.sleep(2)
    else:
        raise SystemExit(f"no S3 server at {settings.s3_endpoint}")
    inbox_bucket, _, inbox_prefix = settings.inbox.removeprefix("s3://").partition("/")
    outbox_bucket = settings.outbox.removeprefix("s3://").partition("/")[0]
    for bucket in {inbox_bucket, outbox_bucket}:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    arn = os.environ.get("I2VFLOW_MINIO_WEBHOOK_ARN", "arn:minio:sqs::I2VFLOW:webhook")
    prefix = inbox_prefix.strip("/") + "/" if inbox_prefix.strip("/") else ""
    rule = QueueConfig(["s3:ObjectCreated:*", "s3:ObjectRemoved:*"], config_id="i2vflow", queue=arn,
                       prefix_filter_rule=PrefixFilterRule(prefix) if prefix else None)
    client.set_bucket_notification(inbox_bucket, NotificationConfig(queue_config_list=[rule]))
    print(f"buckets {sorted({inbox_bucket, outbox_bucket})} ready; events of {inbox_bucket}/{prefix} -> {arn}")


if __name__ == "__main__":
    main()
