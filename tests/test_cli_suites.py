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


def _bare_cli(
    *args: str, cwd: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    environ = {k: v for k, v in os.environ.items() if k != "FORGETGUARD_URL"}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )


def test_missing_file_and_stopped_server_are_one_line_and_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import free_port

    stopped = {"FORGETGUARD_URL": f"http://127.0.0.1:{free_port()}"}
    missing = _bare_cli("suites", "import", "missing.jsonl", cwd=tmp_path, env=stopped)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: cannot read missing.jsonl: No such file or directory"
    ]
    export = _bare_cli("suites", "export", "x", cwd=tmp_path, env=stopped)
    assert export.returncode == 2 and len(export.stderr.strip().splitlines()) == 1
    assert "cannot reach the forgetguard server" in export.stderr
    assert "Traceback" not in export.stderr + missing.stderr
    source = tmp_path / "items.jsonl"
    source.write_text(json.dumps(ITEMS[0]) + "\n")
    unreachable = _bare_cli(
        "suites", "import", str(source), "--name", "a", "--kind", "qa", cwd=tmp_path, env=stopped
    )
    assert unreachable.returncode == 2 and len(unreachable.stderr.strip().splitlines()) == 1


def test_cli_follows_the_url_serve_wrote(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without --server or FORGETGUARD_URL, the CLI uses var/server-url of the directory."""
    with serve(create_app(settings)) as base:
        (tmp_path / "var").mkdir()
        (tmp_path / "var" / "server-url").write_text(base + "\n")
        exported = _bare_cli("suites", "export", "general-qa", cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr
        assert len(exported.stdout.splitlines()) >= 200


def test_import_takes_the_suite_json_export_writes(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    suite = {"name": "whole-qa", "kind": "qa", "description": "two facts", "items": ITEMS}
    source = tmp_path / "suite.json"
    source.write_text(json.dumps(suite, indent=2))
    with serve(create_app(settings)) as base:
        first = _cli("import", str(source), server=base)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == "whole-qa version 1 (created, 2 items)"
        exported = _cli("export", "whole-qa", "--json", server=base)
        assert json.loads(exported.stdout)["items"] == ITEMS
        (tmp_path / "again.json").write_text(exported.stdout)
        again = _cli("import", str(tmp_path / "again.json"), server=base)
        assert again.stdout.strip() == "whole-qa version 1 (unchanged, 2 items)"
        unknown = _cli("export", "whole-q", server=base)
        assert unknown.returncode == 2
        assert unknown.stderr.strip().splitlines() == [
            "error: 404 suite 'whole-q' does not exist; did you mean 'whole-qa'?"
        ]


def test_datasets_copy_makes_the_readme_dataset_path_exist(tmp_path) -> None:  # type: ignore[no-untyped-def]
    copied = _bare_cli("datasets", "copy", cwd=tmp_path, env={"FORGETGUARD_DATA_ROOTS": "data"})
    assert copied.returncode == 0, copied.stderr
    shipped = (REPO / "app" / "datasets" / "drug-qa.jsonl").read_text()
    assert (tmp_path / "data" / "drug-qa.jsonl").read_text() == shipped


def test_a_403_about_paths_does_not_suggest_an_api_key() -> None:
    import httpx

    from app.cli import _refusal

    path = httpx.Response(
        403, json={"detail": "model path 'x' is outside the allowed roots ['models']"}
    )
    assert _refusal(path) == "403 model path 'x' is outside the allowed roots ['models']"
    scope = httpx.Response(
        403,
        json={"detail": "this API key has read scope"},
        headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
    )
    assert "set FORGETGUARD_API_KEY" in _refusal(scope)
    assert "set FORGETGUARD_API_KEY" in _refusal(httpx.Response(401, json={"detail": "no key"}))
