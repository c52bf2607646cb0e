"""Regenerate ``docs/dashboard.png``: the compare page of a collapsed full fine-tune.

    .venv/bin/python -m tests.ui.make_screenshot [--out docs/dashboard.png] [--before ID --after ID
                                                   --database-url URL]

Without ``--before/--after`` it renders realistic seeded data (tests/ui/seed.py) in a temporary
SQLite database; with them it screenshots a real pair from an existing database. Uses Debian's
Chromium through Playwright (no browser download).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from app.core.config import Settings
from app.core.database import make_engine, session_factory, upgrade
from app.main import create_app
from tests.ui.live import chromium, serve
from tests.ui.seed import seed_collapsed_pair

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    """Seed (or reuse) a before/after pair, serve the app, and screenshot its compare page."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--database-url")
    parser.add_argument("--before")
    parser.add_argument("--after")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1640)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'screenshot.db'}"
        if not args.database_url:
            upgrade(url)
        before, after = args.before, args.after
        if not (before and after):
            engine = make_engine(url)
            with session_factory(engine)() as session:
                pair = seed_collapsed_pair(session, with_job=False)
            engine.dispose()
            before, after = pair.before, pair.after
        settings = Settings(
            database_url=url, artifacts_dir=Path(tmp) / "artifacts", cache_dir=Path(tmp) / "cache"
        )
        with serve(create_app(settings)) as base, chromium() as browser:
            page = browser.new_page(
                viewport={"width": args.width, "height": args.height}, device_scale_factor=1
            )
            response = page.goto(f"{base}/ui/compare?before={before}&after={after}")
            if response is None or response.status != 200:
                status = response.status if response else "nothing"
                raise SystemExit(f"the compare page answered {status}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
