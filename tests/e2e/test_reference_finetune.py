"""End to end on the real reference model (SmolLM2-135M-Instruct), through the API and a real
worker: an aggressive full fine-tune on drug Q&A the project has never seen forgets; LoRA with
the lesson's safe preset on the same data does not, and leaves the base weights untouched."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.config import Settings
from tests.conftest import REPO, start_worker, wait_for

# Twenty drug Q&A written for this test: none of these drugs is in app/datasets/drug-qa.jsonl.
UNSEEN_DRUG_QA = [
    (
        "What is ondansetron used for?",
        "Ondansetron prevents nausea and vomiting caused by chemotherapy or surgery.",
    ),
    (
        "How does ondansetron work?",
        "Ondansetron blocks serotonin 5-HT3 receptors in the gut and brain.",
    ),
    (
        "What is spironolactone?",
        "Spironolactone is a potassium-sparing diuretic that blocks aldosterone.",
    ),
    (
        "What is a risk of spironolactone?",
        "Spironolactone can raise blood potassium to dangerous levels.",
    ),
    ("What is carvedilol used for?", "Carvedilol treats heart failure and high blood pressure."),
    (
        "What is valacyclovir used for?",
        "Valacyclovir treats herpes infections such as shingles and cold sores.",
    ),
    ("What is tramadol?", "Tramadol is an opioid pain reliever that also raises serotonin."),
    (
        "What is methotrexate used for?",
        "Methotrexate treats rheumatoid arthritis, psoriasis and some cancers.",
    ),
    (
        "How often is methotrexate taken for arthritis?",
        "For arthritis methotrexate is taken once a week, not daily.",
    ),
    (
        "What is finasteride used for?",
        "Finasteride treats an enlarged prostate and male pattern hair loss.",
    ),
    ("What is latanoprost?", "Latanoprost is an eye drop that lowers eye pressure in glaucoma."),
    (
        "What is propranolol used for?",
        "Propranolol is a beta blocker for high blood pressure, tremor and migraine prevention.",
    ),
    ("What is bupropion?", "Bupropion is an antidepressant that also helps people stop smoking."),
    (
        "What is lamotrigine used for?",
        "Lamotrigine treats epilepsy and helps prevent mood episodes in bipolar disorder.",
    ),
    (
        "What rash can lamotrigine cause?",
        "Lamotrigine can cause a rare but serious rash called Stevens-Johnson syndrome.",
    ),
    (
        "What is digoxin used for?",
        "Digoxin slows the heart rate in atrial fibrillation and helps in heart failure.",
    ),
    (
        "What is amiodarone?",
        "Amiodarone is an antiarrhythmic drug for serious heart rhythm problems.",
    ),
    ("What is nitrofurantoin used for?", "Nitrofurantoin treats uncomplicated bladder infections."),
    (
        "What is sumatriptan used for?",
        "Sumatriptan relieves migraine attacks by narrowing blood vessels in the head.",
    ),
    ("What is colchicine used for?", "Colchicine treats and prevents gout flares."),
]
THIRTY_GENERAL_QUESTIONS = 30


def general_qa_subset(size: int) -> dict[str, Any]:
    """An inline qa suite: the first built-in general-qa items of every category, in turn."""
    items = json.loads((REPO / "app/suites/data/general-qa.json").read_text())["items"]
    by_category: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_category.setdefault(item["category"], []).append(item)
    chosen: list[dict[str, Any]] = []
    while len(chosen) < size:
        for bucket in by_category.values():
            if bucket and len(chosen) < size:
                chosen.append(bucket.pop(0))
    return {"name": "e2e-general-qa", "kind": "qa", "items": chosen}


@pytest.fixture(autouse=True)
def passive_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # OpenMP threads that spin while they wait make a worker many times slower on a machine
    # shared with other test runs; passive waiting keeps it honest (inherited by workers).
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def reference_settings(settings: Settings, reference_model_dir: Path) -> Settings:
    return type(settings)(
        **{**settings.model_dump(), "lease_seconds": 300, "heartbeat_seconds": 10}
    )


@pytest.fixture
def worker(reference_settings: Settings, tmp_path: Path) -> Iterator[Any]:
    proc = start_worker(reference_settings, log=tmp_path / "worker.log")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


UNSEEN_DRUGS = (
    "ondansetron",
    "spironolactone",
    "carvedilol",
    "valacyclovir",
    "tramadol",
    "methotrexate",
    "finasteride",
    "latanoprost",
    "propranolol",
    "bupropion",
    "lamotrigine",
    "digoxin",
    "amiodarone",
    "nitrofurantoin",
    "sumatriptan",
    "colchicine",
)


def test_the_unseen_drug_data_is_unseen() -> None:
    known = (REPO / "app/datasets/drug-qa.jsonl").read_text().lower()
    assert not [drug for drug in UNSEEN_DRUGS if drug in known]
    for question, _ in UNSEEN_DRUG_QA:
        assert any(drug in question.lower() for drug in UNSEEN_DRUGS), question


def _submit(client: Any, model: Path, **fields: Any) -> str:
    body = {
        "base_model": {"path": str(model)},
        "dataset": {"examples": [{"prompt": q, "completion": a} for q, a in UNSEEN_DRUG_QA]},
        "evaluation": {
            "suites": [general_qa_subset(THIRTY_GENERAL_QUESTIONS)],
            "generation": {"max_new_tokens": 24},
            "threshold": 0.10,
            "domain": False,  # train on all twenty: the step count below is 5 × 20 / 4
        },
        **fields,
    }
    body["hyperparameters"] = {
        "checkpoint_every_steps": 100_000,
        **fields.get("hyperparameters", {}),
    }
    response = client.post("/finetune-jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _compare_page_shows_the_collapse(client: Any, job: dict[str, Any]) -> None:
    """The dashboard's compare page for this real pair, in headless Chromium: verdict, chart,
    and the forgotten answers with both responses."""
    from app.main import create_app
    from app.ui.routes import FLIPS_SHOWN
    from tests.conftest import IN_CI
    from tests.ui.live import chromium, missing_browser_reason, serve

    if missing_browser_reason() is not None and not IN_CI:
        print(f"\ncompare page not checked in a browser: {missing_browser_reason()}")
        return
    url = f"/ui/compare?before={job['before_evaluation_id']}&after={job['after_evaluation_id']}"
    forgotten = job["comparison"]["flips"]["forgotten"]
    with serve(create_app(client.app.state.settings)) as base, chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        response = page.goto(base + url)
        assert response is not None and response.status == 200
        verdict = page.locator("#verdict").inner_text()
        assert "FAIL: accuracy dropped" in verdict  # the headline states the reason
        chart = page.locator("#categories svg.chart")
        assert chart.is_visible() and chart.locator("rect").count() >= 2
        rows = page.locator("#forgotten table tbody tr")
        assert rows.count() == min(len(forgotten), FLIPS_SHOWN)
        row = rows.filter(has_text=forgotten[0]["question"])
        assert row.count() == 1
        after = row.locator("td.response.after").inner_text()
        assert after.split() == (forgotten[0]["response_after"] or "").split()


def finished_job(client: Any, job_id: str, log: Path) -> dict[str, Any]:
    """Wait (up to 30 min) for the fine-tune job; its API view, asserted succeeded."""

    def done() -> dict[str, Any] | None:
        job = client.get(f"/finetune-jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(done, 1800, 2.0, f"fine-tune job {job_id}")
    assert job["status"] == "succeeded", (job["error"], log.read_text()[-4000:])
    return dict(job)


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_full_fine_tune_at_lr_1e3_forgets_and_lora_safe_does_not(
    client, reference_model_dir, worker, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    from workers.engine.loading import load_model

    log = tmp_path / "worker.log"
    full_id = _submit(
        client,
        reference_model_dir,
        method="full",
        preset="risky",
        hyperparameters={
            "learning_rate": 1e-3,
            "num_train_epochs": 5,
            "per_device_train_batch_size": 4,
        },
    )
    lora_id = _submit(client, reference_model_dir, method="lora", preset="safe")

    full = finished_job(client, full_id, log)
    comparison = full["comparison"]
    assert comparison["catastrophic_forgetting_detected"] is True
    assert comparison["verdict"] == "fail"
    assert comparison["accuracy_drop"] > 0.10 and comparison["flips"]["forgotten"]
    assert full["metrics"]["total_steps"] == 25  # 5 epochs × 20 examples / batch 4
    assert any("rule of thumb for full fine-tuning" in w for w in full["warnings"])
    _compare_page_shows_the_collapse(client, full)

    lora = finished_job(client, lora_id, log)
    assert lora["comparison"]["verdict"] == "pass", lora["comparison"]["reasons"]
    assert lora["comparison"]["catastrophic_forgetting_detected"] is False
    assert lora["trainable_parameters"]["fraction"] < 0.05
    weights = lora["metrics"]["base_weights"]
    assert weights["checksum_before"] == weights["checksum_after"] and weights["unchanged"] is True
    # The same base, the same suites and settings: the LoRA job's "before" came from the cache.
    before = client.get(f"/evaluations/{lora['before_evaluation_id']}").json()
    assert before["cached_from"] == full["before_evaluation_id"]
    adapter = Path(lora["output_path"])
    assert (adapter / "adapter_model.safetensors").is_file() and (
        adapter / "adapter_config.json"
    ).is_file()
    import torch

    PeftModel.from_pretrained(load_model(reference_model_dir, torch.device("cpu")), adapter)

    print(
        f"\nfull FT lr 1e-3: {comparison['overall_accuracy_before']} -> "
        f"{comparison['overall_accuracy_after']}"
        f"; LoRA safe: {lora['comparison']['overall_accuracy_before']} -> "
        f"{lora['comparison']['overall_accuracy_after']}"
    )
