"""``python -m app.bootstrap``: create the S3 bucket if missing (the compose file runs it once)."""

from __future__ import annotations

import sys
import time

from app.core.config import get_settings
from app.storage import S3Storage, make_storage


def main() -> int:
    storage = make_storage(get_settings())
    if not isinstance(storage, S3Storage):
        return 0
    for attempt in range(30):
        try:
            storage.ensure_bucket()
            storage.ping()
            sys.stdout.write(f"bucket {storage.bucket} ready\n")
            return 0
        except Exception as exc:  # the S3 server may still be starting
            sys.stderr.write(f"waiting for S3 ({attempt + 1}/30): {exc}\n")
            time.sleep(2)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
