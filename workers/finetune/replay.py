"""Replay (the lesson's Mitigation 3) and the general data it, and the Fisher, are drawn from.

``create_replay_dataset`` is the lesson's function with the same arithmetic and the same seeded
shuffle; it returns a list instead of a ``datasets.Dataset``. General data comes from a suite,
inline records, a JSONL file, or ``"self"``: general prompts answered by the base model itself
(self-synthesized rehearsal, for teams with no general data). Model-written answers are
generated once per base-model fingerprint and cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from workers.finetune.statefile import read_state, write_json

# General instructions for "self" replay: everyday tasks across writing, reasoning, facts,
# formats and advice. Deliberately not the items of any built-in evaluation suite, so replay
# never trains on what the after-evaluation measures.
SELF_PROMPTS: tuple[str, ...] = (
    "Explain what recursion is in programming.",
    "Give me three tips for sleeping better.",
    "Write a short poem about the ocean.",
    "What is the difference between weather and climate?",
    "Summarize the plot of Cinderella in two sentences.",
    "How do I make a cup of tea?",
    "Describe a cat to someone who has never seen one.",
    "What are the primary colors?",
    "Write a polite email declining a meeting invitation.",
    "Why do leaves change color in autumn?",
    "List five fruits that are red.",
    "What does a librarian do?",
    "Explain how a rainbow forms.",
    "Give an example of a simile.",
    "What should I pack for a weekend hiking trip?",
    "How many minutes are there in three hours?",
    "Write a haiku about winter.",
    "What is the purpose of a bridge?",
    "Explain why exercise is good for your health.",
    "Translate 'good morning' into French.",
    "What is a noun? Give two examples.",
    "Describe how to plant a seed.",
    "What are the four seasons of the year?",
    "Write one sentence about your favorite food.",
    "Explain the rules of tic-tac-toe.",
    "If a train travels 60 kilometers in one hour, how far does it go in three hours?",
    "What is the opposite of 'ancient'?",
    "Give me a short motivational quote.",
    "How does a thermometer work?",
    "Write a short story opening about a lost key.",
    "What is the difference between a lake and a sea?",
    "Name three musical instruments.",
    "Why is it important to drink water?",
    "Describe the smell of fresh bread.",
    "What is the sum of 25 and 17?",
    "Explain what a map legend is.",
    "Write a thank-you note to a teacher.",
    "What do plants need to grow?",
    "How can I improve my handwriting?",
    "Explain what an email subject line is for.",
    "What is the capital letter rule at the start of a sentence?",
    "Give two reasons people keep diaries.",
    "Describe a busy market in three sentences.",
    "What are the main parts of a bicycle?",
    "How do you say 'thank you' in Spanish?",
    "Write a JSON object describing a book with a title and an author.",
    "What is 9 times 8?",
    "Explain why the sky looks dark at night.",
    "List the days of the week.",
    "What is a good way to start a presentation?",
    "Describe what a volcano is.",
    "Write a short dialogue between two friends planning a picnic.",
    "Why do people use umbrellas?",
    "What is the difference between 'their' and 'there'?",
    "Give me a simple recipe for a salad.",
    "Explain what a calendar is used for.",
    "What happens when you mix blue and yellow paint?",
    "Describe the sound of rain on a roof.",
    "How do birds build nests?",
    "Write a sentence using the word 'gigantic'.",
    "What are three things you can recycle?",
    "Explain how to tie a shoelace.",
    "What is an island?",
    "Give a one-sentence definition of friendship.",
)


def create_replay_dataset(
    domain_data: list[dict[str, Any]],
    general_data: list[dict[str, Any]],
    replay_fraction: float = 0.1,
    seed: int = 42,
) -> list[dict[str, Any]]:
    """The lesson's ``create_replay_dataset``: same arithmetic, same seeded sample and shuffle.

    A private ``random.Random(seed)`` draws exactly what ``random.seed(seed)`` followed by the
    module functions draws, without resetting the process-wide generator.
    """
    rng = random.Random(seed)
    num_replay = int(len(domain_data) * replay_fraction)
    replay_sample = rng.sample(general_data, min(num_replay, len(general_data)))
    combined = domain_data + replay_sample
    rng.shuffle(combined)
    return combined


# --------------------------------------------------------------------------- general records


def suite_records(definition: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """A suite as training records; items without an answer (checklists) come back as prompts.

    Returns ``(records, prompts_needing_answers)``.
    """
    kind = definition["kind"]
    items = definition["items"]
    if kind == "qa":
        return [{"prompt": i["question"], "completion": i["answers"][0]} for i in items], []
    if kind == "multiple_choice":
        return [{"prompt": i["question"], "completion": i["choices"][i["gold"]]} for i in items], []
    if kind == "perplexity":
        return [{"text": i["text"]} for i in items], []
    return [], [str(i["prompt"]) for i in items]


def prompt_of(record: dict[str, Any]) -> str:
    """The question a record asks (its first user turn), or its text."""
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return prompt
        return next((m["content"] for m in prompt if m["role"] == "user"), "")
    if "messages" in record:
        return next((m["content"] for m in record["messages"] if m["role"] == "user"), "")
    return str(record.get("text", ""))


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def evaluation_texts(definitions: Iterable[dict[str, Any]]) -> set[str]:
    """Normalized questions, prompts and texts of the evaluation suites."""
    out = set()
    for definition in definitions:
        for item in definition["items"]:
            for key in ("question", "prompt", "text"):
                if key in item:
                    out.add(_norm(str(item[key])))
    return out


def exclude_evaluated(
    records: Sequence[dict[str, Any]], evaluated: set[str]
) -> tuple[list[dict[str, Any]], int]:
    """Drop records whose prompt is an evaluation item, unless that would leave none.

    Training on an item the after-evaluation scores inflates the after-accuracy and hides
    forgetting. Returns ``(records, excluded)``; ``excluded == -n`` means all ``n`` records
    overlap and were kept (the caller warns).
    """
    kept = [r for r in records if _norm(prompt_of(r)) not in evaluated]
    if not kept and records:
        return list(records), -len(records)
    return kept, len(records) - len(kept)


def prompts_records(prompts: Sequence[str], answers: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"prompt": p, "completion": a} for p, a in zip(prompts, answers, strict=True) if a.strip()
    ]


# --------------------------------------------------------------------------- model-written answers


def completion_cache_key(
    fingerprint: str, prompts: Sequence[str], prompt_format: str, max_new_tokens: int
) -> str:
    """Cache key of model-written answers: the model, the prompts and how they were generated."""
    payload = json.dumps(
        [fingerprint, list(prompts), prompt_format, max_new_tokens], ensure_ascii=False
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_completions(
    cache_dir: Path,
    key: str,
    generate: Callable[[], list[str]],
) -> tuple[list[str], bool]:
    """Answers from ``cache_dir/replay/<key>.json``, else generated and stored: (answers, hit)."""
    path = cache_dir / "replay" / f"{key}.json"
    stored = read_state(path)  # a torn or foreign file: regenerate
    if stored is not None and isinstance(stored.get("answers"), list):
        return [str(a) for a in stored["answers"]], True
    answers = generate()
    write_json(path, {"answers": answers})
    return answers, False
