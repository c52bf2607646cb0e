"""Checkpoint evaluations during training, and the guard that picks what to ship.

At each evaluated step (``evaluation.every_steps`` / ``evaluation.checkpoints``; the last step
always) the weights in memory are evaluated on the job's general suites, the held-out domain
split and the domain suites, and compared with the base's before-evaluation (the same
verdict rules as the final comparison). Each result is one ``finetune_checkpoints`` row: a
resumed attempt skips every step that has its row. Step 0 is the base.

The guard (``guard``) ships the final weights when they pass, else the passing checkpoint
with the largest domain gain, whose trainable weights are kept in ``best/`` as training
goes; ``stop`` ends training at the first checkpoint that does not pass.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

import torch
from sqlalchemy import select

from app.comparison.learned import domain_block, outcome
from app.comparison.service import load_pair
from app.comparison.verdict import build
from app.core.tables import Evaluation, FinetuneCheckpoint
from app.finetune.schemas import evaluation_budget_problem, evaluation_steps
from app.jobs.queue import guarded_write
from app.suites.registry import Row
from workers.context import UserError
from workers.engine.transformers_backend import TransformersBackend
from workers.evaluation.scoring import RunSettings, run_items
from workers.finetune.artifacts import FINAL_ANSWERS
from workers.finetune.data import encode_records, pad_id
from workers.finetune.ewc import trainable_named_parameters
from workers.finetune.holdout import completion_nll
from workers.finetune.stages.domain import KL_TOPK, domain_records, domain_spec, held_out_summary
from workers.finetune.statefile import raise_if_disk_full, read_state, write_json
from workers.finetune.training import GuardStop, autocast_for

if TYPE_CHECKING:
    from workers.finetune.stages.context import StageRun

BEST = "best"


def _gain(domain: dict[str, Any] | None) -> float:
    """How much a checkpoint learned, for ranking: relative NLL fall, else accuracy gain."""
    gain = (domain or {}).get("gain") or {}
    for key in ("relative_nll", "accuracy"):
        if gain.get(key) is not None:
            return float(gain[key])
    return 0.0


class CheckpointEvaluator:
    """Called by the trainer at each evaluated step with the model as it is in memory."""

    # The job's progress phase its evaluations count in (an interpolation names its own).
    phase = "checkpoint evaluations"

    def __init__(
        self,
        run: StageRun,
        model: Any,
        tokenizer: Any,
        fmt: str,
        eval_definitions: list[dict[str, Any]],
        total_steps: int,
        *,
        keep_final_answers: bool = False,
    ) -> None:
        spec = run.request.evaluation
        assert spec is not None
        self.run, self.model, self.tokenizer, self.fmt = run, model, tokenizer, fmt
        self.definitions = eval_definitions
        # The data may have grown since submission: the bound holds for the real step count.
        too_many = evaluation_budget_problem(
            total_steps, spec.every_steps, spec.checkpoints, exact=True
        )
        if too_many is not None:
            raise UserError(too_many.detail)
        self.steps = evaluation_steps(total_steps, spec.every_steps, spec.checkpoints)
        self.total_steps = total_steps
        self.guard = run.request.guard
        self.options = run.request.compare_options()
        # When the saved output reloads as these weights and the after-evaluation uses the
        # same engine, the last checkpoint evaluation's answers are the after-evaluation's.
        self.keep_final_answers = keep_final_answers and spec.backend == "transformers"
        job = run.job()
        assert job.before_evaluation_id is not None
        with run.ctx.sessionmaker() as session:
            before = session.get(Evaluation, job.before_evaluation_id)
            assert before is not None
            self.before_run = {"id": before.id, "source": before.cached_from or before.id}
            self.before_rows, _ = load_pair(session, before, before)
            generation = dict(before.generation)
            self.settings = RunSettings(
                prompt_format=before.prompt_format or fmt,
                max_new_tokens=int(generation.get("max_new_tokens", 50)),
                stop=tuple(generation.get("stop", ())),
            )
            self.domain_suites: list[dict[str, Any]] = []
            self.domain_before_rows: list[Row] = []
            domain = domain_spec(run)
            if domain is not None and domain.suites:
                label = f"{run.request.label or run.job_id}: domain before"
                row = session.scalars(
                    select(Evaluation).where(
                        Evaluation.finetune_job_id == run.job_id, Evaluation.label == label
                    )
                ).first()
                if row is not None and row.status == "succeeded":
                    self.domain_suites = [
                        {"name": s["name"], "kind": s["kind"], **self._definition(session, s)}
                        for s in row.suites
                    ]
                    self.domain_before_rows, _ = load_pair(session, row, row)
        self.held_out: list[Any] = []
        self.held_before: dict[str, Any] | None = None
        self.held_before = read_state(run.job_dir / "domain-before.json")
        if self.held_before is not None:
            _, held = domain_records(run)
            self.held_out, _ = encode_records(tokenizer, held, fmt, run.hp.max_seq_length)

    @property
    def items(self) -> int:
        """Items one evaluation answers: the general suites' and the domain suites'."""
        return sum(len(d["items"]) for d in [*self.definitions, *self.domain_suites])

    def plan(self) -> None:
        """Size the job's progress phase: the steps to evaluate, those stored done."""
        stored = len(set(self._stored()) & set(self.steps))
        self.run.tracker.resize(self.phase, len(self.steps) * self.items, done=stored * self.items)

    @staticmethod
    def _definition(session: Any, snapshot: dict[str, Any]) -> dict[str, Any]:
        from app.core.tables import Suite

        suite = session.get(Suite, snapshot["id"])
        return dict(suite.definition) if suite is not None else {"items": []}

    # -- rows

    def _stored(self) -> dict[int, FinetuneCheckpoint]:
        with self.run.ctx.sessionmaker() as session:
            rows = session.scalars(
                select(FinetuneCheckpoint).where(FinetuneCheckpoint.job_id == self.run.job_id)
            )
            return {r.step: r for r in rows}

    def _store(self, step: int, figures: dict[str, Any]) -> None:
        run = self.run
        with guarded_write(run.ctx.engine, run.ctx.job, run.settings.lease_seconds) as session:
            exists = session.scalars(
                select(FinetuneCheckpoint.id).where(
                    FinetuneCheckpoint.job_id == self.run.job_id, FinetuneCheckpoint.step == step
                )
            ).first()
            if exists is None:
                session.add(FinetuneCheckpoint(job_id=self.run.job_id, step=step, **figures))

    # -- evaluation

    def _answers(
        self, backend: TransformersBackend, suites: list[dict[str, Any]]
    ) -> dict[str, list[dict[str, Any]]]:
        """Each suite's item rows, in item order, as an evaluation stores them."""
        out: dict[str, list[dict[str, Any]]] = {}
        for definition in suites:
            collected: list[dict[str, Any]] = []

            def emit(rows: list[dict[str, Any]], into: list[dict[str, Any]] = collected) -> None:
                self.run.ctx.check_stop()
                into.extend(rows)
                self.run.progress(self.phase, add=len(rows))

            items = list(enumerate(definition["items"]))
            run_items(definition["kind"], backend, definition, items, self.settings, emit)
            out[definition["name"]] = sorted(collected, key=lambda r: r["position"])
        return out

    @staticmethod
    def _rows(suites: list[dict[str, Any]], answers: dict[str, list[dict[str, Any]]]) -> list[Row]:
        return [
            Row.written(r, definition["name"], definition["kind"])
            for definition in suites
            for r in answers[definition["name"]]
        ]

    def _figures(
        self, body: dict[str, Any], rows: list[Row], held: dict[str, Any] | None, domain_body: Any
    ) -> dict[str, Any]:
        general: dict[str, Any] = {
            "accuracy": body.get("overall_accuracy_after"),
            "accuracy_drop": body.get("accuracy_drop"),
        }
        if body.get("checklist"):
            general["checklist_score"] = body["checklist"].get("score_after")
        drift = body.get("drift") or {}
        if drift.get("suites"):
            general["nll_per_token"] = {
                name: suite["nll_per_token_after"] for name, suite in drift["suites"].items()
            }
            general["kl_per_token"] = drift.get("kl_per_token")  # to the base; None if unknown
        domain = None
        spec = domain_spec(self.run)
        if spec is not None and (held is not None or domain_body is not None):
            pair = (self.held_before, held) if held is not None and self.held_before else None
            domain = domain_block(held_out=pair, suites=domain_body, min_gain=spec.min_gain)
            domain.pop("held_out", None)
            domain.pop("suites", None)
        passed = body["verdict"] == "pass"
        verdict: dict[str, Any] = {"verdict": body["verdict"], "reasons": body["reasons"]}
        if domain is not None:
            verdict["outcome"] = outcome(learned=domain["learned"], passed=passed)
        if self.guard is not None:
            verdict["guard"] = "pass" if body["guard"]["acceptable"] else "fail"
        return {
            "general": general,
            "domain": domain,
            "drift": body.get("drift"),
            "verdict": verdict,
        }

    def base(self) -> None:
        """Step 0: the base itself (from the before-evaluation; nothing is run)."""
        if 0 in self._stored():
            return
        body = build(
            self.before_run, self.before_run, self.before_rows, self.before_rows, self.options
        )
        suites = None
        if self.domain_before_rows:
            run = {"id": "domain-before"}
            suites = build(run, run, self.domain_before_rows, self.domain_before_rows, self.options)
        self._store(0, self._figures(body, self.before_rows, self.held_before, suites))

    def __call__(self, step: int) -> None:
        stored = self._stored()
        answers = None
        if step not in stored:
            self.run.stage(f"checkpoint evaluation at step {step}", phase=self.phase)
            figures, answers = self.measure(step)
            self._keep_if_best(step, figures)
        else:
            figures = {"verdict": stored[step].verdict or {}}
        verdict = figures["verdict"]
        stops = (
            self.guard is not None
            and self.guard.action == "stop"
            and verdict.get("guard") == "fail"
            and step < self.total_steps
        )
        if answers is not None:
            if (step == self.total_steps or stops) and self.keep_final_answers:
                # Training ends at this step: the after-evaluation of these weights takes
                # these answers (written before the row, so a stored row implies the file).
                write_json(self.run.job_dir / FINAL_ANSWERS, {"step": step, "suites": answers})
            self._store(step, figures)
            self.run.event(
                f"checkpoint evaluation at step {step}: general accuracy "
                f"{figures['general']['accuracy']}, verdict {verdict['verdict']}",
                data={"step": step, **figures},
            )
        if stops:
            raise GuardStop(step)

    def measure(self, step: int) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """The weights in memory, evaluated as step ``step``: its figures (a checkpoint row),
        and every suite's item rows."""
        model = self.model
        was_training, use_cache = model.training, model.config.use_cache
        model.eval()
        model.config.use_cache = True
        try:
            backend = TransformersBackend(model, self.tokenizer)
            answers = self._answers(backend, self.definitions)
            rows = self._rows(self.definitions, answers)
            after = {"id": f"step-{step}"}
            body = build(self.before_run, after, self.before_rows, rows, self.options)
            held = None
            if self.held_out:
                device = next(model.parameters()).device
                held = held_out_summary(
                    completion_nll(
                        model,
                        self.held_out,
                        pad_id(self.tokenizer),
                        autocast=autocast_for(device),
                        **KL_TOPK,
                    )
                )
            domain_body = None
            if self.domain_suites:
                domain_answers = self._answers(backend, self.domain_suites)
                answers.update(domain_answers)
                domain_rows = self._rows(self.domain_suites, domain_answers)
                run = {"id": "domain-before"}
                domain_body = build(
                    run, {"id": "domain"}, self.domain_before_rows, domain_rows, self.options
                )
        finally:
            model.config.use_cache = use_cache
            model.train(was_training)
        return self._figures(body, rows, held, domain_body), answers

    # -- the guard

    def _best_meta(self) -> dict[str, Any] | None:
        meta = read_state(self.run.job_dir / BEST / "meta.json")
        if meta is None or not {"step", "gain"} <= set(meta):
            return None  # none kept, or unreadable: the next passing step is kept again
        return meta

    def _keep_if_best(self, step: int, figures: dict[str, Any]) -> None:
        """Keep this step's trainable weights when it passes the guard with the best gain yet."""
        if self.guard is None or figures["verdict"].get("guard") != "pass":
            return
        gain = _gain(figures["domain"])
        best = self._best_meta()
        if best is not None and best["gain"] >= gain:
            return
        from safetensors.torch import save_file

        tmp = self.run.job_dir / f".tmp-{BEST}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            save_file(
                {
                    n: p.detach().cpu().contiguous()
                    for n, p in trainable_named_parameters(self.model)
                },
                str(tmp / "trainable.safetensors"),
            )
            write_json(tmp / "meta.json", {"step": step, "gain": gain})
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_disk_full(exc, f"the guard's checkpoint of step {step}")
            raise
        shutil.rmtree(self.run.job_dir / BEST, ignore_errors=True)
        tmp.rename(self.run.job_dir / BEST)

    def ship(self, final_step: int, stopped: bool) -> dict[str, Any]:
        """Which weights to save (loading the best checkpoint's into the model); and why.

        ``step`` None: no checkpoint passes the guard, so nothing is shipped.
        """
        assert self.guard is not None
        final = self._stored().get(final_step)
        final_guard = (final.verdict or {}).get("guard") if final is not None else None
        if final_guard == "pass" and not stopped:
            return {"step": final_step, "reason": "the final step passes the guard"}
        why_final = (
            f"training stopped at step {final_step}, the first checkpoint that fails the guard"
            if stopped
            else f"the final step {final_step} fails the guard"
        )
        best = self._best_meta()
        if best is None:
            # Shipping weights that fail would put forgetting into production: ship none.
            return {
                "step": None,
                "reason": f"{why_final}, and no checkpoint passed it: nothing shipped; the base "
                "model stays the recommendation",
                "passed": False,
                "recommendation": "base",
            }
        from safetensors.torch import load_file

        weights = load_file(str(self.run.job_dir / BEST / "trainable.safetensors"))
        params = dict(trainable_named_parameters(self.model))
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        return {
            "step": int(best["step"]),
            "reason": f"{why_final}; shipped step {best['step']}, the checkpoint with the "
            "largest domain gain among those that pass the guard",
        }
