"""Regenerate ``docs/dashboard.png`` (the compare page of a collapsed full fine-tune) and
``docs/forgetting-curve.png`` (a fine-tune page's forgetting and learning curves).

    .venv/bin/python -m tests.ui.make_screenshot [--out docs/dashboard.png] [--before ID --after ID
                                                   --database-url URL]
    .venv/bin/python -m tests.ui.make_screenshot --finetune-job ID --database-url URL
                                                 [--out docs/forgetting-curve.png]

Without ``--before/--after`` it renders realistic seeded data (tests/ui/seed.py) in a temporary
SQLite database; with them it screenshots a real pair from an existing database. With
``--finetune-job`` it screenshots that job's checkpoint curves (the page's ``#checkpoints``
section), e.g. from the database ``forgetguard demo --keep`` leaves. Uses Debian's Chromium
through Playwright (no browser download).
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
    parser.add_argument("--out", type=Path)
    parser.add_argument("--database-url")
    parser.add_argument("--before")
    parser.add_argument("--after")
    parser.add_argument("--finetune-job", help="screenshot this job's checkpoint curves")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1640)
    args = parser.parse_args()
    if args.finetune_job and not args.database_url:
        parser.error("--finetune-job needs --database-url")
    name = "forgetting-curve.png" if args.finetune_job else "dashboard.png"
    out: Path = args.out or REPO / "docs" / name

    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'screenshot.db'}"
        if not args.database_url:
            upgrade(url)
        before, after = args.before, args.after
        if not (before and after) and not args.finetune_job:
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
            path = (
                f"/ui/finetune-jobs/{args.finetune_job}"
                if args.finetune_job
                else f"/ui/compare?before={before}&after={after}"
            )
            response = page.goto(f"{base}{path}")
            if response is None or response.status != 200:
                status = response.status if response else "nothing"
                raise SystemExit(f"{path} answered {status}")
            out.parent.mkdir(parents=True, exist_ok=True)
            if args.finetune_job:
                curves = page.locator("#checkpoints")
                if curves.count() == 0:
                    raise SystemExit(f"fine-tune job {args.finetune_job} has no checkpoint curves")
                curves.screenshot(path=str(out))
            else:
                page.screenshot(path=str(out), full_page=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
