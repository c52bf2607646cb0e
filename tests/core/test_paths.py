"""``resolve_under``: client-named paths are resolved and must stay inside the roots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.core.errors import Problem
from app.core.paths import is_under, resolve_under


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An allowed root holding one plain model directory, and a secret outside it."""
    (tmp_path / "models" / "good").mkdir(parents=True)
    (tmp_path / "models" / "good" / "config.json").write_text("{}")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "weights.safetensors").write_text("not yours")
    return (tmp_path / "models").resolve()


def resolve(raw: str | Path, root: Path) -> Path:
    return resolve_under(str(raw), [root], what="model", env_var="FORGETGUARD_MODEL_ROOTS")


def refused(raw: str | Path, root: Path) -> Problem:
    with pytest.raises(Problem) as caught:
        resolve(raw, root)
    return caught.value


def test_a_directory_inside_a_root_resolves(root: Path) -> None:
    assert resolve(root / "good", root) == root / "good"
    assert resolve(root / "good" / ".." / "good", root) == root / "good"
    assert resolve(root, root) == root


def test_dot_dot_out_of_a_root_is_403(root: Path) -> None:
    problem = refused(f"{root}/../../etc", root)
    assert problem.status == 403
    assert "outside the allowed roots" in problem.detail
    assert "FORGETGUARD_MODEL_ROOTS" in problem.detail
    assert refused("../../etc", root).status == 403
    assert refused("/etc/passwd", root).status == 403


def test_a_sibling_sharing_the_root_prefix_is_outside(root: Path) -> None:
    evil = root.parent / (root.name + "-evil")
    evil.mkdir()
    assert refused(evil, root).status == 403


def test_a_symlink_in_a_root_pointing_outside_is_403(root: Path) -> None:
    link = root / "escape"
    link.symlink_to(root.parent / "secret", target_is_directory=True)
    assert refused(link, root).status == 403


def test_a_symlinked_file_inside_a_model_dir_pointing_outside_is_403(root: Path) -> None:
    (root / "good" / "model.safetensors").symlink_to(root.parent / "secret" / "weights.safetensors")
    problem = refused(root / "good", root)
    assert problem.status == 403
    assert "'model.safetensors', a link that leads outside" in problem.detail


def test_symlinks_that_stay_inside_the_roots_are_fine(root: Path) -> None:
    blob = root / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_text("weights")
    (root / "good" / "model.safetensors").symlink_to(blob)  # the Hugging Face cache layout
    (root / "alias").symlink_to(root / "good", target_is_directory=True)
    assert resolve(root / "alias", root) == root / "good"


def test_a_symlink_loop_is_422_not_a_crash(root: Path) -> None:
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    problem = refused(root / "loop-a", root)
    assert problem.status in (403, 422)


def test_nul_bytes_and_empty_paths_are_422(root: Path) -> None:
    assert refused("", root).status == 422
    assert refused(f"{root}/good\x00/etc/passwd", root).status == 422


def test_unknown_home_directory_is_422(root: Path) -> None:
    assert refused("~no-such-user-forgetguard/models", root).status == 422


def test_overlong_names_are_refused_cleanly(root: Path) -> None:
    problem = refused(root / ("a" * 300), root)  # one component past NAME_MAX
    assert problem.status in (403, 422)
    assert len(problem.detail) < 600  # the echo of a hostile path is cut short


def test_is_under_is_component_wise(tmp_path: Path) -> None:
    assert is_under(tmp_path / "a" / "b", [tmp_path / "a"])
    assert not is_under(tmp_path / "ab", [tmp_path / "a"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every directory")
def test_an_unreadable_directory_is_422(root: Path) -> None:
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        assert refused(locked, root).status == 422
    finally:
        locked.chmod(0o755)


# --- the containment walk covers every file at any depth (issue 16) ----------------------------


def test_a_link_out_in_a_nested_subfolder_is_403_and_its_target_unnamed(root: Path) -> None:
    nested = root / "good" / "additional_chat_templates" / "deeper"
    nested.mkdir(parents=True)
    (nested / "tool.jinja").symlink_to(root.parent / "secret" / "weights.safetensors")
    problem = refused(root / "good", root)
    assert problem.status == 403
    assert "'additional_chat_templates/deeper/tool.jinja'" in problem.detail
    assert "secret" not in problem.detail and "not yours" not in problem.detail


def test_a_subfolder_linking_inside_is_walked_too(root: Path) -> None:
    """A link that stays inside is followed, and what it leads to is checked in turn."""
    shared = root / "shared"
    shared.mkdir()
    (shared / "template.jinja").symlink_to(root.parent / "secret" / "weights.safetensors")
    (root / "good" / "templates").symlink_to(shared, target_is_directory=True)
    problem = refused(root / "good", root)
    assert problem.status == 403 and "'templates/template.jinja'" in problem.detail


def test_folder_loops_inside_a_model_dir_end(root: Path) -> None:
    (root / "good" / "sub").mkdir()
    (root / "good" / "sub" / "up").symlink_to(root / "good", target_is_directory=True)
    assert resolve(root / "good", root) == root / "good"


def test_a_dangling_nested_link_is_refused(root: Path) -> None:
    (root / "good" / "sub").mkdir()
    (root / "good" / "sub" / "gone").symlink_to(root / "nowhere")
    assert refused(root / "good", root).status == 403
