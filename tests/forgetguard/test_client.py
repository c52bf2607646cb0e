"""The Python client against a real ``forgetguard serve`` (tiny model, real worker, real HTTP)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.core.config import Settings
from forgetguard import Client, Comparison, Evaluation, JobFailed, ProblemError, Unreachable
from tests.conftest import free_port, start_serve

SUITE = {
    "name": "client-qa",
    "kind": "qa",
    "items": [
        {"id": "fr", "question": "What is the capital of France?", "answers": ["Paris"]},
        {"id": "it", "question": "What is the capital of Italy?", "answers": ["Rome"]},
    ],
}


@pytest.mark.slow
def test_evaluate_wait_and_compare_through_the_client(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    server, http = start_serve(settings, "--workers", "1", "--device", "cpu")
    try:
        seen: list[str] = []
        with Client(str(http.base_url)) as fg:
            base = fg.evaluate(str(tiny_model_dir), suites=[SUITE], label="base")
            again = fg.evaluate(str(tiny_model_dir), suites=[SUITE], label="base", cache=False)
            done = fg.wait(
                base.id, again.id, timeout=300, on_progress=lambda j: seen.append(j.status)
            )
            comparison = fg.compare(base.id, again.id)
        assert all(isinstance(e, Evaluation) and e.status == "succeeded" for e in done)
        assert done[0].results and done[0].results["client-qa"]["total"] == 2
        assert isinstance(comparison, Comparison) and comparison.passed
        assert comparison.accuracy_drop == 0.0 and seen
    finally:
        server.terminate()
        server.wait(30)


def test_problems_are_raised_with_their_body(client) -> None:  # type: ignore[no-untyped-def]
    # TestClient is an httpx.Client: the same code path, in-process.
    fg = Client("http://testserver", http=client)
    with pytest.raises(ProblemError) as missing:
        fg.evaluation("ev_nope")
    assert missing.value.status == 404 and "ev_nope" in missing.value.detail
    assert missing.value.problem["status"] == 404
    with pytest.raises(ProblemError) as bad:
        fg.evaluate("/definitely/outside/the/roots", suites=["general-qa"])
    assert bad.value.status == 403 and "outside" in bad.value.detail
    with pytest.raises(ProblemError) as unfinished:
        fg.compare("ev_a", "ev_b")
    assert unfinished.value.status == 404


def test_a_cancelled_job_raises_job_failed(client, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    fg = Client("http://testserver", http=client)
    queued = fg.evaluate(str(tiny_model_dir), suites=[SUITE])
    client.post(f"/evaluations/{queued.id}/cancel")
    with pytest.raises(JobFailed, match="cancelled"):
        fg.wait(queued.id, timeout=5, poll_seconds=0.01)


def test_an_unreachable_server_raises_after_retries() -> None:
    sleeps: list[float] = []
    fg = Client(f"http://127.0.0.1:{free_port()}", retries=2, sleep=sleeps.append)
    with pytest.raises(Unreachable, match="cannot reach"):
        fg.health()
    assert sleeps == [0.25, 0.5]


def test_the_client_imports_with_nothing_of_the_server() -> None:
    """The client, the gate and its commands, with fastapi, sqlalchemy, torch, app and workers
    blocked: none of them is needed."""
    blocked = ["fastapi", "sqlalchemy", "torch", "transformers", "app", "workers", "uvicorn"]
    code = (
        "import sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import forgetguard\n"
        "from forgetguard import Client\n"
        "import forgetguard.cli, forgetguard.gate, forgetguard.tracking\n"
        "from forgetguard.cli import main\n"
        "sys.argv = ['forgetguard', 'gate', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]" and "--max-category-drop" in out
