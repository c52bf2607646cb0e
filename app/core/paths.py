"""Client-named paths: resolved (symlinks followed, ``..`` collapsed) and kept inside roots."""

from __future__ import annotations

import stat
from pathlib import Path

from app.core.clientfiles import not_regular
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


# The walk over a model directory is bounded: nothing a loader reads spans more than this.
MAX_WALK_ENTRIES = 10_000
MAX_WALK_DEPTH = 16


def _refuse_escaping_links(directory: Path, roots: list[Path], *, what: str, shown: str) -> None:
    """Refuse a directory any of whose files, at any depth, is a link leading out of the roots.

    The directory itself is inside a root, but loading reads the files in it and in its
    subfolders (tokenizer files, a chat template under ``additional_chat_templates/``, an
    adapter's weights), and a symlinked file is followed wherever it points. This is the one
    containment walk: the API runs it at submission and the worker again right before loading.
    Links that stay inside the roots are followed (and walked in turn); a refusal names the
    entry as the client sees it inside its directory, never where the link leads.
    """
    try:
        if not directory.is_dir():
            return
    except OSError:
        raise Problem(422, "Invalid path", f"{what} path {shown} cannot be read") from None
    seen: set[Path] = {directory}
    pending: list[tuple[Path, str, int]] = [(directory, "", 0)]
    count = 0
    while pending:
        folder, prefix, depth = pending.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            raise Problem(
                422, "Invalid path", f"{what} path {shown} has a folder that cannot be read"
            ) from None
        for entry in entries:
            count += 1
            if count > MAX_WALK_ENTRIES:
                raise Problem(
                    422,
                    "Directory too large",
                    f"{what} path {shown} holds more than {MAX_WALK_ENTRIES} files; a model "
                    "directory holds its config, tokenizer and weights only",
                )
            name = prefix + entry.name
            try:
                link = entry.is_symlink()
                target = entry.resolve(strict=True) if link else entry
                mode = target.stat().st_mode  # stat never opens: a FIFO cannot block it
                is_dir = stat.S_ISDIR(mode)
            except (OSError, RuntimeError):
                link, target, is_dir, mode = True, None, False, 0
            if link and (target is None or not is_under(target, roots)):
                raise Problem(
                    403,
                    "Path outside the allowed roots",
                    f"{what} path {shown} holds {name!r}, a link that leads outside the "
                    "allowed roots (or nowhere); copy the file into the directory instead",
                )
            kind = None if is_dir else not_regular(mode)
            if kind is not None:
                # A loader opening a FIFO waits for a writer forever; a device never ends.
                raise Problem(
                    422,
                    "Not a regular file",
                    f"{what} path {shown} holds {name!r}, which is {kind}; a {what} folder "
                    "holds regular files and folders only",
                )
            if is_dir and target is not None and target not in seen:
                if depth + 1 > MAX_WALK_DEPTH:
                    raise Problem(
                        422,
                        "Directory too deep",
                        f"{what} path {shown} nests folders more than {MAX_WALK_DEPTH} deep",
                    )
                seen.add(target)
                pending.append((target, name + "/", depth + 1))
