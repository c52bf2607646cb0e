"""Client-named paths: resolved (symlinks followed, ``..`` collapsed) and kept inside roots."""

from __future__ import annotations

from pathlib import Path

from app.core.errors import Problem


def resolve_under(raw: str, roots: list[Path], *, what: str, env_var: str) -> Path:
    """Resolve ``raw`` and require it under one of ``roots`` (403 otherwise).

    Called at submission by the API and again by the worker right before loading, because
    the file system may change in between (a symlink swapped after the check).
    """
    if not raw or "\x00" in raw:
        raise Problem(422, "Invalid path", f"{what} path must be a non-empty path")
    shown = _shown(raw)
    try:
        resolved = Path(raw).expanduser().resolve()
    except (OSError, RuntimeError):
        # RuntimeError: a symlink loop, or "~user" for a user that does not exist.
        raise Problem(
            422,
            "Invalid path",
            f"{what} path {shown} cannot be resolved (a symlink loop or an unknown ~user)",
        ) from None
    if not is_under(resolved, roots):
        raise Problem(
            403,
            "Path outside the allowed roots",
            f"{what} path {shown} is outside the allowed roots {[str(r) for r in roots]} "
            f"(set {env_var})",
        )
    _refuse_escaping_links(resolved, roots, what=what, shown=shown)
    return resolved


def is_under(path: Path, roots: list[Path]) -> bool:
    """Whether the resolved ``path`` is one of ``roots`` or lies inside one."""
    return any(path == root or path.is_relative_to(root) for root in roots)


def _shown(raw: str, limit: int = 200) -> str:
    return repr(raw if len(raw) <= limit else raw[:limit] + "…")


def _refuse_escaping_links(directory: Path, roots: list[Path], *, what: str, shown: str) -> None:
    """Refuse a directory holding a link (``model.safetensors -> /secret``) that leaves the roots.

    The directory itself is inside a root, but loading reads the files in it, and a symlinked
    file would be followed wherever it points.
    """
    try:
        if not directory.is_dir():
            return
        entries = list(directory.iterdir())
    except OSError:
        raise Problem(422, "Invalid path", f"{what} path {shown} cannot be read") from None
    for entry in entries:
        try:
            if not entry.is_symlink():
                continue
            target = entry.resolve()
        except (OSError, RuntimeError):
            target = None
        if target is None or not is_under(target, roots):
            raise Problem(
                403,
                "Path outside the allowed roots",
                f"{what} path {shown} holds {entry.name!r}, a link that leads outside the "
                "allowed roots (or nowhere); copy the file into the directory instead",
            )
