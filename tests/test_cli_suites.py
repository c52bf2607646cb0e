"""`forgetguard suites import/export` against a real server."""

from __future__ import annotations

import json
import subprocess
import sys

from app.main import create_app
from tests.conftest import REPO
from tests.ui.live import serve

ITEMS = [
    {
        "id": "q1",
        "question": "What is the capital of Peru?",
        "answers": ["Lima"],
        "category": "geo",
    },
    {"id": "q2", "question": "What is 3 times 9?", "answers": ["27"], "category": "math"},
]


def _cli(*args: str, server: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "suites", *args, "--server", server],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_versions_and_export_round_trips(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "mine.jsonl"
    source.write_text("\n".join(json.dumps(i) for i in ITEMS) + "\n")
    with serve(create_app(settings)) as base:
        first = _cli("import", str(source), "--name", "my-qa", "--kind", "qa", server=base)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == "my-qa version 1 (created, 2 items)"
        again = _cli("import", str(source), "--name", "my-qa", "--kind", "qa", server=base)
        assert again.stdout.strip() == "my-qa version 1 (unchanged, 2 items)"
        source.write_text(json.dumps(ITEMS[0]) + "\n")
        changed = _cli("import", str(source), "--name", "my-qa", "--kind", "qa", server=base)
        assert changed.stdout.strip() == "my-qa version 2 (created, 1 items)"

        exported = _cli("export", "my-qa@1", server=base)
        assert [json.loads(line) for line in exported.stdout.splitlines()] == ITEMS

        source.write_text('{"id": "bad", "question": "?", "answers": []}\n')
        bad = _cli("import", str(source), "--name", "my-qa", "--kind", "qa", server=base)
        assert bad.returncode == 2 and "answers" in bad.stderr

        source.write_text("not json\n")
        broken = _cli("import", str(source), "--name", "my-qa", "--kind", "qa", server=base)
        assert broken.returncode == 2 and "mine.jsonl:1: not valid JSON" in broken.stderr
