"""Content checks for the built-in general-text perplexity suite and the drug-QA dataset."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERAL_TEXT_PATH = ROOT / "app" / "suites" / "data" / "general-text.json"
DRUG_QA_PATH = ROOT / "app" / "datasets" / "drug-qa.jsonl"


def test_general_text_suite() -> None:
    suite = json.loads(GENERAL_TEXT_PATH.read_text(encoding="utf-8"))
    assert suite["name"] == "general-text"
    assert suite["kind"] == "perplexity"
    items = suite["items"]
    assert len(items) >= 40
    ids = [item["id"] for item in items]
    texts = [item["text"] for item in items]
    assert len(set(ids)) == len(ids)
    assert len(set(texts)) == len(texts)
    for item in items:
        assert isinstance(item["text"], str)
        assert len(item["text"].split()) >= 40, item["id"]
        assert item.get("category"), item["id"]


def test_drug_qa_dataset() -> None:
    lines = DRUG_QA_PATH.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert len(records) >= 60
    for record in records:
        assert isinstance(record, dict)
        assert isinstance(record.get("prompt"), str) and record["prompt"].strip()
        assert isinstance(record.get("completion"), str) and record["completion"].strip()
    prompts = [record["prompt"] for record in records]
    assert len(set(prompts)) == len(prompts)
