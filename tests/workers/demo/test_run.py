"""``forgetguard demo``: the lesson's toy demonstrations; the table's plumbing on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_checked
from workers.demo.run import DemoRow, DemoSizes, demo_runs, demo_suites, drug_examples, format_table
from workers.demo.toy import forgetting_ratio, report, shared_weight

# Tiny tensors: one torch thread (the conftest fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_shared_weight_is_pulled_from_task_a_to_task_b() -> None:
    result = shared_weight()
    # The lesson's numbers: w 1.0 → -2.0, Task A loss 0 → 9, Task B loss 9 → 0.
    assert (result.w_before, result.task_a_loss_before, result.task_b_loss_before) == (
        1.0,
        0.0,
        9.0,
    )
    assert result.w_after == pytest.approx(-2.0)
    assert result.task_a_loss_after == pytest.approx(9.0)
    assert result.task_b_loss_after == pytest.approx(0.0)


def test_an_ewc_penalty_keeps_the_shared_weight_between_the_optima() -> None:
    result = shared_weight(ewc_importance=0.25, steps=200)
    assert result.w_after == pytest.approx((0.25 * 2 - 2) / (0.25 * 2 + 1), abs=1e-4)
    assert result.task_a_loss_after < 9.0


def test_the_two_head_network_forgets_task_a() -> None:
    result = forgetting_ratio(seed=0)
    assert result.task_a_loss_after > 2 * result.task_a_loss_before
    assert forgetting_ratio(seed=0) == result  # seeded: reproducible


def test_the_toy_report_prints_both_demonstrations() -> None:
    text = report(seeds=2)
    assert "Forgetting ratio" in text and "w: 1.00 -> -2.00" in text and "9.00" in text


def test_demo_sizes_and_runs() -> None:
    sizes = DemoSizes()
    qa, checklist, text = demo_suites(sizes)
    assert checklist == "forgetting-checklist"
    assert len({i["category"] for i in qa["items"]}) == 7  # type: ignore[index]
    assert len(qa["items"]) == 7 * sizes.qa_per_category  # type: ignore[index]
    assert len(text["items"]) == sizes.texts  # type: ignore[index]
    assert len(drug_examples(sizes.drug_examples)) == 20
    names = [name for name, _ in demo_runs(sizes)]
    assert len(names) == 6 and names[0] == "full FT, lesson's risky preset"
    runs = dict(demo_runs(sizes))
    assert runs["LoRA, safe preset"] == {"method": "lora", "preset": "safe"}
    interpolated = runs["full FT, lr 0.001, interpolated α 0.5"]
    assert interpolated["interpolation"] == {"alphas": [0.5]}
    assert interpolated["hyperparameters"] == runs["full FT, lr 0.001"]["hyperparameters"]
    assert runs["full FT, lr 0.001"]["evaluation"] == {"checkpoints": sizes.curve_checkpoints}


def test_format_table_has_a_column_per_category() -> None:
    qa = {
        "overall_accuracy": 0.5,
        "by_category": {"geo": {"accuracy": 1.0}, "math": {"accuracy": 0.0}},
    }
    rows = [
        DemoRow("base", None, "succeeded", qa, 0.75, 3.5, domain_nll=2.5),
        DemoRow(
            "full FT", "ft_1", "succeeded", qa, 0.25, 9.6, "fail", domain_nll=0.8, kl_per_token=1.25
        ),
    ]
    table = format_table(rows).splitlines()
    assert table[0] == (
        "| run | general-qa | geo | math | checklist | NLL/token | drug NLL/token (held out) "
        "| KL to base | verdict |"
    )
    assert table[2] == "| base | 0.50 | 1.00 | 0.00 | 0.75 | 3.50 | 2.50 | – | (base) |"
    assert table[3] == "| full FT | 0.50 | 1.00 | 0.00 | 0.25 | 9.60 | 0.80 | 1.250 | fail |"


@pytest.mark.slow
def test_demo_command_prints_the_table(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "demo",
            "--quick",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--workdir",
            str(tmp_path / "demo"),
            "--markdown",
            str(tmp_path / "t.md"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    main, heading, curve_text = result.stdout.partition(
        "Checkpoint evaluations of full FT, lr 0.001"
    )
    assert heading, result.stdout[-3000:]
    lines = [line for line in main.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| run | general-qa |") and "NLL/token" in lines[0]
    names = [line.split("|")[1].strip() for line in lines[2:]]
    assert names == [
        "base",
        "full FT, lesson's risky preset",
        "full FT, lr 0.001",
        "full FT, lr 0.001 + replay",
        "full FT, lr 0.001 + EWC",
        "LoRA, safe preset",
        "full FT, lr 0.001, interpolated α 0.5",
    ]
    assert all(
        line.rstrip(" |").split("|")[-1].strip() in ("pass", "fail", "(base)") for line in lines[2:]
    )
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    domain, kl = header.index("drug NLL/token (held out)"), header.index("KL to base")
    # Held-out drug NLL for every row (the base's from before training); KL for every
    # fine-tune that shipped its own weights (the interpolated row may come from its sweep).
    assert all(float(row[domain]) > 0 for row in cells)
    assert all(row[kl] != "–" and float(row[kl]) >= 0 for row in cells[1:6])
    # The aggressive run's forgetting and learning curve: the base, then each checkpoint
    # (QUICK: 2 of its 20 steps), each with a verdict and, after the base, KL on both texts.
    curve = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in curve_text.splitlines()[4:]
        if line.startswith("|")
    ]
    assert [row[0] for row in curve] == ["0 (base)", "10", "20"]
    assert all(row[7] in ("pass", "fail") and float(row[1]) >= 0 for row in curve)
    assert all(float(row[5]) >= 0 and float(row[6]) > 0 for row in curve[1:])
    assert (tmp_path / "t.md").read_text().strip() == result.stdout.strip()
    toy = run_checked(sys.executable, "-m", "app.cli", "demo", "--toy", env=env)
    assert "Forgetting ratio" in toy
