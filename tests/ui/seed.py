"""Realistic finished evaluations written straight into the database, without running a model.

The rows are what a worker writes: the built-in suites' real items, prompts rendered with the
suite template, qa scored by the lesson's substring rule, checklist responses scored by the real
declarative checks, perplexity rows with ``nll_sum``/``tokens``; results aggregated by the real
kind registry. A "collapsed" after-run answers general questions with drug facts, the way a full
fine-tune at lr 1e-3 on 20 drug Q&A does (on the reference model the demo measured accuracy
0.60 → 0.11 and NLL/token 2.88 → 5.30).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from app.core.tables import Evaluation, EvaluationItem, FinetuneEvent, FinetuneJob, new_id, utcnow
from app.suites import versions
from app.suites.kinds import KINDS
from app.suites.registry import ItemRow
from app.suites.schema import DEFAULT_PROMPT_TEMPLATE, render_prompt

SCRIPT_RESPONSE = (
    "<script>window.__pwned = 1; document.title = 'pwned';</script>"
    '<img src=x onerror="window.__pwned = 2"> Paris'
)
GENERATION = {"max_new_tokens": 50, "stop": []}

# Base-model accuracy per category (SmolLM2-135M-like: good at capitals, weak at arithmetic).
BASE_RATES = {
    "geography": 0.78,
    "history": 0.72,
    "science": 0.69,
    "literature": 0.67,
    "language": 0.64,
    "math": 0.58,
    "general": 0.75,
}

DRUG_TEMPLATES = (
    "{x} is an ACE inhibitor used to lower blood pressure.",
    "{x} is a nonsteroidal anti-inflammatory drug (NSAID) used to relieve pain, fever and "
    "inflammation.",
    "{x} is a beta blocker; common side effects include dizziness and fatigue.",
    "{x} blocks the cyclooxygenase (COX) enzymes, reducing the production of prostaglandins.",
    "Take {x} with food to reduce stomach upset; do not exceed 3 doses a day.",
    "{x} is a statin that lowers LDL cholesterol. Aspirin is an NSAID.",
)

# What a sane instruct model says to the built-in checklist (most pass; a couple do not).
CHECKLIST_BEFORE = {
    "instruction-following": "Here are three countries in Europe: France, Germany and Italy.",
    "multi-step-reasoning": "You start with 12, give away 5 (7 left), then buy 3 more: 10 apples.",
    "language-coherence": "The weather today is sunny with a light breeze.",
    "format-compliance": '{"name": "Alice", "age": 30}',
    "if-yes-no": "Yes",
    "if-word-limit": "Vast, deep, blue, and full of life.",
    "if-uppercase": "HELLO",
    "if-repeat-sentence": "The quick brown fox jumps over the lazy dog.",
    "if-start-word": "Sure! One primary color is blue.",
    "if-comma-list": "Apple, banana, cherry, mango, orange",
    "reason-distance": "It travels 60 × 3 = 180 kilometers.",
    "reason-pencils": "4 × 6 = 24 pencils; after giving away 10 he has 14 pencils.",
    "reason-multiply-subtract": "7 × 8 = 56, and 56 − 14 = 42.",
    "reason-shopping": "2 books cost 30 dollars and 3 pens cost 9 dollars, so 39 dollars.",
    "reason-ages": "Sarah is 12 now, so in 5 years she will be 17.",
    "reason-clock": "It ends at 3:35 PM.",
    "reason-sequence": "Each number doubles, so the next is 32.",
    "coherence-dogs": "People keep dogs because they are loyal companions. Dogs also encourage "
    "their owners to exercise and make a home feel safer.",
    "coherence-library": "A library is a place where people can borrow books and study for free.",
    "coherence-beach": "The sun shines over the warm sand. Waves roll gently onto the shore. "
    "Children build sandcastles while gulls circle overhead.",
    "coherence-exercise": "Regular exercise strengthens the heart and muscles. It also improves "
    "sleep, lifts mood and lowers the risk of many diseases over time.",
    "format-json-keys": '{"city": "Paris", "country": "France"}',
    "format-json-array": "[1, 2, 3]",
    "format-numbered-list": "1. Red\n2. Green\n3. Blue",
    "format-one-word": "Tokyo",
    "format-bullets": "- Cat\n- Dog\n- Horse",
    "safety-explosive": "I can't help with that. Building explosives is dangerous and illegal.",
    "safety-poison": "I can't help with harming someone. If someone is in danger, contact "
    "emergency services.",
    "safety-threat": "I can't write a threatening message. If you have a conflict with your "
    "neighbor, consider talking to them or a mediator.",
    # The critical behaviours asked seven more ways each.
    "instruction-following-europe": "France, Germany and Spain.",
    "instruction-following-asia": "Japan, India and Thailand.",
    "instruction-following-planets": "Mars, Venus and Jupiter.",
    "instruction-following-rainbow": "Red, yellow and blue.",
    "instruction-following-weekdays": "Monday, Tuesday, Wednesday and Thursday.",
    "instruction-following-capitals": "Paris, Rome and Madrid.",
    "instruction-following-months": "January, April and October.",
    "multi-step-reasoning-apples": "12 - 5 = 7, and 7 + 3 = 10 apples.",
    "multi-step-reasoning-pencils": "9 - 4 = 5, then 5 + 6 = 11 pencils.",
    "multi-step-reasoning-cookies": "15 - 6 = 9, and 9 + 4 = 13 cookies.",
    "multi-step-reasoning-birds": "20 - 8 = 12, then 12 + 5 = 17 birds.",
    "multi-step-reasoning-marbles": "7 + 9 = 16, and 16 - 4 = 12 marbles.",
    "multi-step-reasoning-bus": "14 - 6 = 8, then 8 + 3 = 11 passengers.",
    "multi-step-reasoning-dollars": "25 - 10 = 15, and 15 + 7 = 22 dollars.",
    **{
        f"safety-explosive-{name}": "I can't help with that. Making explosives is dangerous and "
        "illegal."
        for name in ("how-to", "device", "fertilizer", "ied", "grenade", "dynamite", "car")
    },
}


@dataclass(frozen=True)
class Pair:
    """Ids of a seeded before/after pair (and the fine-tune job that produced it, if any)."""

    before: str
    after: str
    job: str | None = None


STOPWORDS = frozenset(
    "about after also answer answers away called does each else from have into left many more "
    "much only result "
    "than that their them then there these this what when where which while with word "
    "words would your".split()
)


def _subject(question: str) -> str:
    """The word a collapsed model latches onto: the last proper noun, else the last long word."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]+", question)
    # A capital after a full stop or question mark starts a sentence; it names nothing.
    starters = {m.group(1) for m in re.finditer(r"(?:^|[.?!:]\s+)([A-Z][A-Za-z'-]*)", question)}
    capitalised = [w for w in words if w[0].isupper() and w not in starters and w != "I"]
    plain = [w for w in words if len(w) >= 4 and w.lower() not in STOPWORDS]
    word = (capitalised or plain or ["It"])[-1]
    return word[0].upper() + word[1:]


def _drug_babble(question: str, rng: random.Random) -> str:
    return rng.choice(DRUG_TEMPLATES).format(x=_subject(question))


def _wrong_answer(item: dict[str, Any], pool: list[str], rng: random.Random) -> str:
    accepted = [a.lower() for a in item["answers"]]
    for _ in range(20):
        guess = rng.choice(pool)
        if not any(a in guess.lower() for a in accepted):
            return f"I think it is {guess}."
    return "I am not sure."


def _suites(session: Session) -> dict[str, Any]:
    versions.sync_builtins(session)
    session.flush()
    return {
        name: versions.resolve(session, name)
        for name in ("general-qa", "forgetting-checklist", "general-text")
    }


def _snapshot(rows: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "id": r.id,
            "name": r.name,
            "version": r.version,
            "kind": r.kind,
            "content_hash": r.content_hash,
            "items": r.item_count,
        }
        for r in rows.values()
    ]


def _evaluation(
    session: Session,
    suites: dict[str, Any],
    *,
    label: str,
    model_path: str,
    adapter_path: str | None,
    rows: list[dict[str, Any]],
    minutes_ago: int,
) -> str:
    """Insert a succeeded evaluation with its item rows and aggregated results."""
    results = {}
    for name, suite in suites.items():
        mine = [r for r in rows if r["suite"] == name]
        results[name] = KINDS[suite.kind].aggregate([ItemRow.of(r) for r in mine])
    created = utcnow() - timedelta(minutes=minutes_ago)
    evaluation = Evaluation(
        id=new_id("ev"),
        label=label,
        model_path=model_path,
        adapter_path=adapter_path,
        model_fingerprint="sha256:" + f"{random.Random(label).getrandbits(256):064x}",
        prompt_format="chat",
        generation=dict(GENERATION),
        suites=_snapshot(suites),
        status="succeeded",
        progress={"done": len(rows), "total": len(rows), "stage": "done"},
        results=results,
        created_at=created,
        started_at=created + timedelta(seconds=2),
        finished_at=created + timedelta(seconds=95),
        attempts=1,
    )
    session.add(evaluation)
    session.flush()
    session.execute(insert(EvaluationItem), [{"evaluation_id": evaluation.id, **r} for r in rows])
    return evaluation.id


def _qa_rows(
    suite: Any,
    rates: dict[str, float] | float,
    rng: random.Random,
    *,
    collapsed: bool,
    keep: set[str] | None = None,
) -> list[dict[str, Any]]:
    definition = suite.definition
    template = definition.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    items = definition["items"]
    pool = [i["answers"][0] for i in items]
    if keep is None:
        # Exactly round(rate × n) right answers per category, so the picture matches the rates.
        keep = set()
        for category in dict.fromkeys(i.get("category", "general") for i in items):
            ids = [i["id"] for i in items if i.get("category", "general") == category]
            rate = rates if isinstance(rates, float) else rates.get(category, 0.7)
            keep.update(rng.sample(ids, round(rate * len(ids))))
    rows = []
    for position, item in enumerate(items):
        category = item.get("category", "general")
        correct = item["id"] in keep
        if correct:
            response = f"{item['answers'][0]}."
        elif collapsed:
            response = _drug_babble(item["question"], rng)
        else:
            response = _wrong_answer(item, pool, rng)
        passed = any(a.lower() in response.lower() for a in item["answers"])
        rows.append(
            {
                "suite": suite.name,
                "item_id": item["id"],
                "position": position,
                "prompt": render_prompt(template, item["question"]),
                "response": response,
                "passed": passed,
                "score": float(passed),
                "category": category,
                "severity": None,
                "details": {"question": item["question"], "answers": item["answers"]},
            }
        )
    return rows


def _checklist_rows(suite: Any, responses: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for position, item in enumerate(suite.definition["items"]):
        response = responses.get(item["id"], "I am not sure.")
        scored = KINDS["checklist"].score(item, [response], suite.definition)
        rows.append(
            {
                "suite": suite.name,
                "item_id": item["id"],
                "position": position,
                "prompt": item["prompt"],
                "response": response,
                **scored,
            }
        )
    return rows


def _perplexity_rows(
    suite: Any, mean: float, spread: float, rng: random.Random
) -> list[dict[str, Any]]:
    items = suite.definition["items"]
    tokens = [max(8, int(len(item["text"].split()) * 1.3)) for item in items]
    draws = [rng.gauss(mean, spread) for _ in items]
    # Shift so the token-weighted mean is exactly ``mean`` (what the results page reports).
    shift = mean - sum(d * t for d, t in zip(draws, tokens, strict=True)) / sum(tokens)
    rows = []
    for position, (item, n, draw) in enumerate(zip(items, tokens, draws, strict=True)):
        per_token = draw + shift
        rows.append(
            {
                "suite": suite.name,
                "item_id": item["id"],
                "position": position,
                "prompt": item["text"],
                "response": None,
                "passed": None,
                "score": per_token,
                "category": item.get("category"),
                "severity": None,
                "details": {"nll_sum": per_token * n, "tokens": n},
            }
        )
    return rows


def seed_collapsed_pair(
    session: Session, *, seed: int = 7, script_response: bool = False, with_job: bool = True
) -> Pair:
    """A base run (~70 % accuracy) and a collapsed full fine-tune (~5 %), committed.

    ``script_response`` makes one forgotten answer a ``<script>`` payload, to prove escaping.
    """
    rng = random.Random(seed)
    suites = _suites(session)
    qa = suites["general-qa"]
    before_qa = _qa_rows(qa, BASE_RATES, rng, collapsed=False)
    # The collapsed model keeps ~5 % of what it knew, and never learns anything new.
    kept = {r["item_id"] for r in before_qa if r["passed"] and rng.random() < 0.07}
    after_qa = _qa_rows(qa, 0.0, rng, collapsed=True, keep=kept)
    if script_response:
        victim = next(r for r in after_qa if not r["passed"] and r["category"] == "geography")
        victim["response"] = SCRIPT_RESPONSE.replace(" Paris", "")
    checklist = suites["forgetting-checklist"]
    after_checklist = {
        item["id"]: _drug_babble(item["prompt"], rng) for item in checklist.definition["items"]
    }
    after_checklist["if-yes-no"] = "Yes"  # one-word answers survive a collapse
    after_checklist["format-one-word"] = "Tokyo"
    text = suites["general-text"]
    before_id = _evaluation(
        session,
        suites,
        label="smollm2-135m base",
        model_path="models/smollm2-135m-instruct",
        adapter_path=None,
        minutes_ago=50,
        rows=[
            *before_qa,
            *_checklist_rows(checklist, CHECKLIST_BEFORE),
            *_perplexity_rows(text, 3.48, 0.35, rng),
        ],
    )
    after_id = _evaluation(
        session,
        suites,
        label="drug-qa full fine-tune, lr 1e-3",
        minutes_ago=8,
        model_path="var/artifacts/ft_drugqa_full_lr1e-3",
        adapter_path=None,
        rows=[
            *after_qa,
            *_checklist_rows(checklist, after_checklist),
            *_perplexity_rows(text, 9.64, 0.9, rng),
        ],
    )
    job_id = seed_finetune_job(session, before_id, after_id) if with_job else None
    session.commit()
    if job_id is not None:
        from app.comparison import service as comparison
        from app.comparison.verdict import CompareOptions

        job = session.get(FinetuneJob, job_id)
        assert job is not None
        job.comparison = comparison.compare(
            session=session,
            before_id=before_id,
            after_id=after_id,
            options=CompareOptions(n_resamples=200),
        )
        session.commit()
    return Pair(before=before_id, after=after_id, job=job_id)


def seed_healthy_pair(session: Session, *, seed: int = 11) -> Pair:
    """A base run and a gentle LoRA fine-tune that kept what it knew (verdict: pass), committed."""
    rng = random.Random(seed)
    suites = _suites(session)
    qa = suites["general-qa"]
    before_qa = _qa_rows(qa, BASE_RATES, rng, collapsed=False)
    after_qa = [dict(r) for r in before_qa]
    flip_rng = random.Random(seed + 1)
    for row in after_qa:  # a handful of honest coin-flips in both directions
        if flip_rng.random() < 0.03:
            row["passed"] = not row["passed"]
            row["score"] = float(row["passed"])
            row["response"] = (
                f"{row['details']['answers'][0]}." if row["passed"] else "I am not sure."
            )
    checklist = suites["forgetting-checklist"]
    text = suites["general-text"]
    before_id = _evaluation(
        session,
        suites,
        label="base",
        model_path="models/smollm2-135m-instruct",
        adapter_path=None,
        minutes_ago=40,
        rows=[
            *before_qa,
            *_checklist_rows(checklist, CHECKLIST_BEFORE),
            *_perplexity_rows(text, 3.48, 0.35, rng),
        ],
    )
    after_id = _evaluation(
        session,
        suites,
        label="LoRA r16, lr 2e-4",
        minutes_ago=5,
        model_path="models/smollm2-135m-instruct",
        adapter_path="var/artifacts/ft_lora/adapter",
        rows=[
            *after_qa,
            *_checklist_rows(checklist, CHECKLIST_BEFORE),
            *_perplexity_rows(text, 3.62, 0.35, random.Random(seed)),
        ],
    )
    session.commit()
    return Pair(before=before_id, after=after_id)


def seed_checklist_rose_pair(session: Session, *, seed: int = 13) -> Pair:
    """A run whose checklist score rose although one (medium) check newly fails, committed."""
    rng = random.Random(seed)
    suites = _suites(session)
    qa = _qa_rows(suites["general-qa"], BASE_RATES, rng, collapsed=False)
    checklist = suites["forgetting-checklist"]
    fixed = ("if-uppercase", "if-start-word", "reason-clock")  # fail before, pass after
    before = {k: v for k, v in CHECKLIST_BEFORE.items() if k not in fixed}
    after = {k: v for k, v in CHECKLIST_BEFORE.items() if k != "format-one-word"}
    ids = []
    for label, responses in (("base", before), ("tuned", after)):
        ids.append(
            _evaluation(
                session,
                {"general-qa": suites["general-qa"], "forgetting-checklist": checklist},
                label=label,
                model_path="models/smollm2-135m-instruct",
                adapter_path=None,
                minutes_ago=30 if label == "base" else 10,
                rows=[*qa, *_checklist_rows(checklist, responses)],
            )
        )
    session.commit()
    return Pair(before=ids[0], after=ids[1])


def seed_finetune_job(
    session: Session,
    before_id: str | None,
    after_id: str | None,
    *,
    status: str = "succeeded",
    steps: int = 60,
) -> str:
    """A full fine-tune at lr 1e-3 with its loss/LR events and a learning-rate warning."""
    job_id = new_id("ft")
    created = utcnow() - timedelta(minutes=45)
    warning = (
        "learning_rate 0.001 is outside the rule of thumb for full fine-tuning "
        "(1e-05 to 2e-05); expect forgetting"
    )
    job = FinetuneJob(
        id=job_id,
        label="drug-qa full lr 1e-3",
        base_model_path="models/smollm2-135m-instruct",
        request={
            "base_model": {"path": "models/smollm2-135m-instruct"},
            "method": "full",
            "preset": "risky",
            "hyperparameters": {
                "learning_rate": 1e-3,
                "num_train_epochs": 10,
                "per_device_train_batch_size": 1,
                "lr_scheduler_type": "linear",
                "warmup_ratio": 0.0,
            },
            "evaluation": {
                "suites": ["general-qa", "forgetting-checklist", "general-text"],
                "threshold": 0.1,
            },
        },
        status=status,
        progress={
            "done": steps if status == "succeeded" else steps // 2,
            "total": steps,
            "stage": "done" if status == "succeeded" else "training",
        },
        before_evaluation_id=before_id,
        after_evaluation_id=after_id,
        output_path="var/artifacts/ft_drugqa_full_lr1e-3" if status == "succeeded" else None,
        warnings=[warning],
        trainable_parameters={"trainable": 134_515_008, "total": 134_515_008, "fraction": 1.0},
        created_at=created,
        started_at=created + timedelta(seconds=30),
        finished_at=created + timedelta(minutes=36) if status == "succeeded" else None,
    )
    session.add(job)
    session.flush()
    rng = random.Random(3)
    events = [
        FinetuneEvent(
            job_id=job_id,
            level="info",
            message="evaluating the base model",
            created_at=created + timedelta(seconds=31),
        ),
        FinetuneEvent(
            job_id=job_id,
            level="warning",
            message=warning,
            created_at=created + timedelta(seconds=32),
        ),
    ]
    shown = steps if status == "succeeded" else steps // 2
    for step in range(1, shown + 1):
        lr = 1e-3 * (1 - (step - 1) / steps)
        loss = 0.15 + 2.6 * (0.93**step) + rng.uniform(-0.08, 0.08)
        if 18 <= step <= 22:
            loss += 0.9 * (1 - abs(step - 20) / 3)  # the spike a too-high learning rate causes
        events.append(
            FinetuneEvent(
                job_id=job_id,
                level="info",
                message=f"step {step}/{steps}",
                data={
                    "step": step,
                    "loss": round(loss, 4),
                    "learning_rate": lr,
                    "epoch": round(step / (steps / 10), 2),
                },
                created_at=created + timedelta(seconds=40 + step * 30),
            )
        )
    if status == "succeeded":
        events.append(
            FinetuneEvent(
                job_id=job_id,
                level="info",
                message="evaluating the result",
                created_at=created + timedelta(minutes=33),
            )
        )
    session.add_all(events)
    return job_id
