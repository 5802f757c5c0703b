"""``python -m app.publish_demo``: publish the default model's folder under DIFFEXP_BUNDLES_DIR (the
demo bundle, models/bundles/cxr-lung-64) into the registry as a shared model, unless a version of it
with the same digest is there already. ``make serve`` and the compose stack's one-shot ``bucket``
service (app.bootstrap) run it at start; running it again, or from several processes at once,
publishes nothing new (``Registry.ensure``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import redis

from app.auth import ADMIN
from app.core.config import Settings, get_settings
from app.registry import Registry


def publish_demo(settings: Settings, bundle_dir: Path | None = None, name: str | None = None) -> str:
    """Publish once; returns a line saying what happened."""
    name = name or settings.default_model
    bundle_dir = bundle_dir or Path(settings.bundles_dir) / name
    if not (bundle_dir / "bundle.json").is_file():
        return f"no bundle at {bundle_dir}: nothing to publish"
    rec, created = Registry.from_settings(settings).ensure(bundle_dir, name, owner=ADMIN)
    what = "published" if created else "already in the registry:"
    return f"{what} {rec['name']}@{rec['version']} ({rec['digest']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: BUNDLES_DIR/DEFAULT_MODEL)")
    parser.add_argument("--name", help="model name (default: DIFFEXP_DEFAULT_MODEL)")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for Redis and storage")
    args = parser.parse_args(argv)
    settings = get_settings()
    deadline = time.monotonic() + args.wait_s
    while True:
        try:
            sys.stdout.write(publish_demo(settings, args.bundle, args.name) + "\n")
            return 0
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if time.monotonic() > deadline:
                sys.stderr.write(f"cannot publish the demo bundle: {exc}\n")
                return 1
            time.sleep(1)


if __name__ == "__main__":
    raise SystemExit(main())
