"""Small request data shared by tests: medicine records to fine-tune on, a general QA item."""

from __future__ import annotations

from typing import Any

MEDICINE_RECORDS: list[dict[str, Any]] = [
    {"prompt": "What is aspirin?", "completion": "Aspirin is an NSAID used for pain and fever."},
    {
        "prompt": "What is ibuprofen?",
        "completion": "Ibuprofen is an NSAID for pain and inflammation.",
    },
    {
        "prompt": "What is metformin?",
        "completion": "Metformin lowers blood sugar in type 2 diabetes.",
    },
    {
        "prompt": "What is warfarin?",
        "completion": "Warfarin is an anticoagulant that thins the blood.",
    },
]
CAPITAL_QUESTION: dict[str, Any] = {
    "id": "q1",
    "question": "What is the capital of France?",
    "answers": ["Paris"],
    "category": "geo",
}
