"""API latency under load, on the embedded default (SQLite + uvicorn), loopback only.

Measures:
  * ``GET /evaluations/{id}`` p50/p99 with 50 concurrent connections (closed loop, bounded), with
    ``wrk`` when it is installed (``apt-get install wrk``), else a Python client;
  * ``GET /compare`` on two 10,000-item evaluations (sequential requests): computed from the
    database (new options each time), then the same requests again, answered from the store.

The database is a fresh SQLite file filled with synthetic finished evaluations (rows written
directly; no model needed). Usage:

    python benchmarks/api_load.py [--clients 50] [--requests 2000] [--items 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import insert

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.core.database import make_engine, session_factory, upgrade  # noqa: E402
from app.core.tables import Evaluation, EvaluationItem, new_id, utcnow  # noqa: E402

CATEGORIES = ["geography", "math", "science", "literature", "history", "language", "general"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seed(url: str, items: int) -> tuple[str, str]:
    """Two finished evaluations of ``items`` qa items each; the second forgot 20 % of them."""
    rng = random.Random(0)
    suite = {
        "id": 0,
        "name": "load-qa",
        "version": 1,
        "kind": "qa",
        "content_hash": "sha256:load",
        "items": items,
    }
    engine = make_engine(url)
    ids = []
    with session_factory(engine)() as session:
        for label, forget in (("before", 0.0), ("after", 0.2)):
            ev = Evaluation(
                id=new_id("ev"),
                label=label,
                model_path="models/load",
                generation={"max_new_tokens": 50, "stop": []},
                suites=[suite],
                prompt_format="chat",
                status="succeeded",
                progress={"done": items, "total": items, "stage": "done"},
                results={
                    "load-qa": {
                        "kind": "qa",
                        "overall_accuracy": 0.7 - forget,
                        "correct": 0,
                        "total": items,
                        "by_category": {
                            c: {"correct": 1, "total": 1, "accuracy": 1.0} for c in CATEGORIES
                        },
                    }
                },
                started_at=utcnow(),
                finished_at=utcnow(),
            )
            session.add(ev)
            session.flush()
            rows = []
            for i in range(items):
                correct = (i * 7919) % 10 < 7 and rng.random() >= forget
                rows.append(
                    {
                        "evaluation_id": ev.id,
                        "suite": "load-qa",
                        "item_id": f"q{i:05d}",
                        "position": i,
                        "prompt": f"Question number {i}?",
                        "response": "An answer of some length. " * 3,
                        "passed": correct,
                        "score": float(correct),
                        "category": CATEGORIES[i % 7],
                        "severity": None,
                        "details": {"question": f"Question number {i}?", "answers": ["x"]},
                    }
                )
            session.execute(insert(EvaluationItem), rows)
            ids.append(ev.id)
        session.commit()
    engine.dispose()
    return ids[0], ids[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def ms(latency: dict[str, float]) -> str:
    """A table's "p50 | p99" cells."""
    return f"{latency['p50']:.1f} ms | {latency['p99']:.1f} ms"


def summary(latencies: list[float]) -> dict[str, float]:
    """p50, p99 and max in milliseconds."""
    return {
        "p50": 1000 * percentile(latencies, 0.50),
        "p99": 1000 * percentile(latencies, 0.99),
        "max": 1000 * max(latencies),
    }


async def load(base: str, path: str, clients: int, total: int) -> list[float]:
    """Closed loop: ``clients`` concurrent clients issue ``total`` requests in all."""
    latencies: list[float] = []
    remaining = total
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as http:

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                response = await http.get(path)
                latencies.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def wrk_latency(wrk: str, url: str, clients: int, seconds: int) -> dict[str, float]:
    """p50/p99 in ms from ``wrk --latency`` (a C load generator: the client costs little CPU)."""
    out = subprocess.run(
        [wrk, "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    result = {}
    for line in out.splitlines():
        match = re.match(r"\s+(50|99)%\s+([\d.]+)(us|ms|s)$", line)
        if match:
            result[f"p{match.group(1)}"] = float(match.group(2)) * units[match.group(3)]
        if line.startswith("Requests/sec:"):
            result["requests_per_second"] = float(line.split()[1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=2000, help="without wrk: requests in all")
    parser.add_argument("--seconds", type=int, default=10, help="with wrk: duration")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--compare-requests", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fg-load-") as tmp:
        url = f"sqlite:///{tmp}/load.db"
        upgrade(url)
        before, after = seed(url, args.items)
        port = _free_port()
        env = {**os.environ, "FORGETGUARD_DATABASE_URL": url, "FORGETGUARD_MODEL_ROOTS": tmp}
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "0"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
            # Warm up, then measure.
            asyncio.run(load(base, f"/evaluations/{after}", 4, 50))
            wrk = shutil.which("wrk")
            if wrk:
                get_ms = wrk_latency(wrk, f"{base}/evaluations/{after}", args.clients, args.seconds)
                get_tool = f"wrk -t1 -c{args.clients} -d{args.seconds}s"
            else:
                lat = asyncio.run(load(base, f"/evaluations/{after}", args.clients, args.requests))
                get_ms = summary(lat)
                get_tool = f"httpx, {args.requests} requests (the Python client shares the CPU)"
            # Cold: every request asks with other options (a new threshold), so each answer is
            # computed from the database. Warm: the same question again, answered from the
            # per-process store of comparisons (both runs are final, so the answer is too).
            compare_cold, compare_warm = [], []
            with httpx.Client(base_url=base, timeout=60) as http:
                pair = {"before": before, "after": after}
                for i in range(args.compare_requests):
                    params = {**pair, "threshold": round(0.05 + i / 1000, 3)}
                    for latencies in (compare_cold, compare_warm):
                        start = time.perf_counter()
                        response = http.get("/compare", params=params)
                        latencies.append(time.perf_counter() - start)
                        assert response.status_code == 200, response.text
        finally:
            server.terminate()
            server.wait(timeout=30)

    result = {
        "clients": args.clients,
        "items_per_evaluation": args.items,
        "get_evaluation_ms": get_ms,
        "get_evaluation_tool": get_tool,
        "compare_cold_ms": summary(compare_cold),
        "compare_warm_ms": summary(compare_warm),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "api_load.json").write_text(json.dumps(result, indent=2))
    table = (
        "| measurement | p50 | p99 |\n|---|---|---|\n"
        f"| `GET /evaluations/{{id}}`, {args.clients} concurrent clients ({get_tool}) "
        f"| {ms(get_ms)} |\n"
        f"| `GET /compare`, two {args.items:,}-item evaluations, {args.compare_requests} "
        f"requests with new options (computed) | {ms(result['compare_cold_ms'])} |\n"
        f"| the same {args.compare_requests} requests again (stored answer) "
        f"| {ms(result['compare_warm_ms'])} |\n"
    )
    (args.out / "api_load.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
