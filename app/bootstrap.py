"""``python -m app.bootstrap``: create the S3 bucket if missing, then publish the demo bundle into the
registry if missing (``app.publish_demo``); the compose file runs it once before the API and workers."""

from __future__ import annotations

import sys
import time

from app import publish_demo
from app.core.config import get_settings
from app.storage import S3Storage, make_storage


def main() -> int:
    storage = make_storage(get_settings())
    if isinstance(storage, S3Storage) and not ensure_bucket(storage):
        return 1
    return publish_demo.main([])


def ensure_bucket(storage: S3Storage) -> bool:
    for attempt in range(30):
        try:
            storage.ensure_bucket()
            storage.ping()
            sys.stdout.write(f"bucket {storage.bucket} ready\n")
            return True
        except Exception as exc:  # the S3 server may still be starting
            sys.stderr.write(f"waiting for S3 ({attempt + 1}/30): {exc}\n")
            time.sleep(2)
    return False


if __name__ == "__main__":
    raise SystemExit(main())
