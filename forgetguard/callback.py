"""A ``transformers.TrainerCallback`` that watches forgetting while you train.

Works with ``Trainer``, TRL's ``SFTTrainer`` and anything else that accepts Hugging Face
callbacks. Every ``every_steps`` optimizer steps (or at each save) it evaluates the model on
general suites, compares it with the base under the rule book (``forgetguard.rules``), and
records the forgetting curve (``callback.curve``: accuracy, drop, verdict and the guard's
reading at each point). It decides as a forgetguard fine-tune job's guard does: a point is
acceptable when its verdict passes and general accuracy fell by at most ``max_drop``. With
``stop=True`` (or, as before, when ``max_drop=`` is given) it stops training
(``control.should_training_stop``) at the first point that is not:

    from forgetguard.callback import ForgetGuardCallback
    from forgetguard.rules import CompareRules

    guard = ForgetGuardCallback(every_steps=50, rules=CompareRules(max_drop=0.05), stop=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[guard])
    trainer.train()
    print(guard.curve, guard.stopped_at, guard.stop_reason)

Two ways to evaluate:

* in-process (default): the live model, through the forgetguard worker engine and the server's
  comparison code (needs the ``worker`` extra: torch, transformers). Suites are built-in names
  (``general-qa`` …) or suite dicts; ``max_items`` keeps each evaluation short with a seeded
  sample stratified across categories (``callback.sample`` lists the items).
* on a server: pass ``client=forgetguard.Client(url)`` and ``base_model=PATH`` (a path the
  server may read). At each save the saved checkpoint (``checkpoint-N``: a full model, or a
  peft adapter on ``base_model``) is evaluated there and compared with ``/compare``, so the
  results are stored beside your other runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from forgetguard.client import Client, Evaluation
from forgetguard.rules import CompareRules
from forgetguard.sampling import stratified_sample

log = logging.getLogger("forgetguard.callback")


def builtin_suite(name: str) -> dict[str, Any]:
    """A built-in suite definition, read from the installed package (no server needed)."""
    path = resources.files("app.suites") / "data" / f"{name}.json"
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ValueError(f"no built-in suite named {name!r}") from None


def _tokenizer(processing_class: Any, hook_kwargs: Mapping[str, Any]) -> Any:
    """The tokenizer a Trainer hook was given: ``processing_class``, or ``tokenizer`` (older
    transformers)."""
    return processing_class or hook_kwargs.get("tokenizer")


class ForgetGuardCallback(TrainerCallback):
    """Evaluate during training, keep the forgetting curve, stop when the guard trips."""

    def __init__(
        self,
        *,
        every_steps: int | None = None,
        suites: Sequence[str | Mapping[str, Any]] = ("general-qa",),
        max_items: int | None = 40,
        seed: int = 0,
        rules: CompareRules | None = None,
        stop: bool | None = None,
        max_drop: float | None = None,
        threshold: float | None = None,
        prompt_format: str | None = None,
        max_new_tokens: int = 50,
        client: Client | None = None,
        base_model: str | None = None,
    ) -> None:
        """``rules``: the rule book (its defaults when None); ``max_drop=`` and ``threshold=``
        set those rules on it. ``stop``: stop training at the first point the guard does not
        accept (default: only when ``max_drop=`` is given). ``max_items``/``seed``: evaluate a
        seeded sample of each suite, stratified across its categories."""
        if every_steps is not None and every_steps < 1:
            raise ValueError("every_steps must be at least 1 (or None to evaluate at each save)")
        if client is not None and base_model is None:
            raise ValueError("a server-side guard needs base_model: the path the server reads")
        given = {
            name: value
            for name, value in (("max_drop", max_drop), ("threshold", threshold))
            if value is not None
        }
        base_rules = rules if rules is not None else CompareRules()
        self.rules = type(base_rules).model_validate({**base_rules.model_dump(), **given})
        self.stop = max_drop is not None if stop is None else stop
        self.every_steps = every_steps
        self.prompt_format = prompt_format
        self.max_new_tokens = max_new_tokens
        self.client = client
        self.base_model = base_model
        self.suites = [self._definition(s, max_items, seed) for s in suites]
        # Which items each suite is evaluated on: suite name → item ids.
        self.sample: dict[str, list[str]] = {
            d["name"]: [str(item["id"]) for item in d["items"]] for d in self.suites
        }
        self.curve: list[dict[str, Any]] = []
        self.stopped_at: int | None = None
        self.stop_reason: str | None = None
        self._base_eval: Evaluation | None = None
        self._base_rows: list[Any] = []

    @property
    def max_drop(self) -> float:
        """The guard's ``max_drop`` (the rule book's)."""
        return self.rules.max_drop

    @property
    def threshold(self) -> float:
        """The verdict's ``threshold`` (the rule book's)."""
        return self.rules.threshold

    @staticmethod
    def _definition(
        suite: str | Mapping[str, Any], max_items: int | None, seed: int
    ) -> dict[str, Any]:
        definition = builtin_suite(suite) if isinstance(suite, str) else dict(suite)
        total = len(definition["items"])
        if max_items is not None and total > max_items:
            definition = {
                **definition,
                "name": f"{definition['name']}-sample{max_items}",
                "description": f"{max_items} of the {total} items of {definition['name']}, "
                f"a sample stratified across categories (seed {seed})",
                "items": stratified_sample(definition["items"], max_items, seed=seed),
            }
        return definition

    # ------------------------------------------------------------------ in-process

    def _evaluate_here(self, model: Any, tokenizer: Any, step: int) -> dict[str, Any]:
        """Results of the live model; from step 1 on, ``_comparison`` with the base (the same
        comparison ``/compare`` makes, under the rule book)."""
        from workers.evaluation.inprocess import compare_rows, results, run_suites

        was_training = model.training
        model.eval()
        try:
            rows = run_suites(
                model,
                tokenizer,
                self.suites,
                prompt_format=self.prompt_format,
                max_new_tokens=self.max_new_tokens,
            )
        finally:
            if was_training:
                model.train()
        out: dict[str, Any] = dict(results(rows))
        if not self._base_rows:
            self._base_rows = rows
        else:
            out["_comparison"] = compare_rows(
                self._base_rows, rows, self.rules, after_id=f"step-{step}"
            )
        return out

    # ------------------------------------------------------------------ on a server

    def _submit(self, path: str, adapter: str | None, label: str) -> Evaluation:
        assert self.client is not None
        evaluation = self.client.evaluate(
            path,
            adapter_path=adapter,
            suites=self.suites,
            prompt_format=self.prompt_format,
            max_new_tokens=self.max_new_tokens,
            label=label,
        )
        done = self.client.wait(evaluation.id)[0]
        assert isinstance(done, Evaluation)
        return done

    def _evaluate_on_server(self, checkpoint: Path) -> dict[str, Any]:
        assert self.client is not None and self.base_model is not None
        assert self._base_eval is not None, "on_train_begin evaluates the base first"
        is_adapter = (checkpoint / "adapter_config.json").is_file()
        after = self._submit(
            self.base_model if is_adapter else str(checkpoint),
            str(checkpoint) if is_adapter else None,
            f"callback: {checkpoint.name}",
        )
        comparison = self.client.compare(self._base_eval.id, after.id, rules=self.rules)
        results = dict(after.results or {})
        results["_comparison"] = {"evaluation_id": after.id, **comparison.model_dump()}
        return results

    # ------------------------------------------------------------------ the curve

    @staticmethod
    def _general(results: Mapping[str, Any]) -> dict[str, Any]:
        point: dict[str, Any] = {}
        for name, result in results.items():
            if name.startswith("_"):
                continue
            if "overall_accuracy" in result and "accuracy" not in point:
                point["accuracy"] = result["overall_accuracy"]
            if result.get("kind") == "checklist":
                point["checklist_score"] = result["score"]
            if result.get("kind") == "perplexity":
                point["nll_per_token"] = result["nll_per_token"]
        return point

    def _record_here(self, step: int, model: Any, tokenizer: Any, control: TrainerControl) -> None:
        """Evaluate the model being trained in this process at ``step`` and record it."""
        self._record(step, self._evaluate_here(model, tokenizer, step), control)

    def _record(self, step: int, results: Mapping[str, Any], control: TrainerControl) -> None:
        general = self._general(results)
        base = self.curve[0]["general"] if self.curve else general
        drop = None
        if "accuracy" in general and "accuracy" in base:
            drop = base["accuracy"] - general["accuracy"]
        point: dict[str, Any] = {"step": step, "general": general, "drop": drop}
        comparison = results.get("_comparison")
        if comparison is not None:
            # The guard of a fine-tune job, read off the comparison with the base.
            point["verdict"] = comparison["verdict"]
            point["reasons"] = list(comparison.get("reasons") or [])
            point["guard"] = self.rules.guard(comparison)
        point["results"] = dict(results)
        self.curve.append(point)
        log.info("forgetguard: step %d general %s drop %s", step, general, drop)
        if self.stop and comparison is not None and not point["guard"]["acceptable"]:
            self.stopped_at = step
            self.stop_reason = self._why(point, comparison)
            control.should_training_stop = True

    def _why(self, point: Mapping[str, Any], comparison: Mapping[str, Any]) -> str:
        guard = point["guard"]
        rule = (
            "the verdict must pass and general accuracy fall by at most "
            f"max_drop {guard['max_drop']:g}"
        )
        if point["verdict"] != "pass":
            found = "; ".join(point["reasons"]) or "verdict fail"
            return f"step {point['step']} fails the guard ({rule}): {found}"
        before = comparison.get("overall_accuracy_before")
        after = comparison.get("overall_accuracy_after")
        return (
            f"step {point['step']} fails the guard ({rule}): general accuracy fell "
            f"{guard['drop']:.3f} below the base ({before:.3f} → {after:.3f})"
        )

    # ------------------------------------------------------------------ callback hooks

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        """Evaluate the starting point (step 0): the base every later point is compared to."""
        if self.curve:
            return
        if self.client is not None:
            self._base_eval = self._submit(str(self.base_model), None, "callback: base")
            self._record(state.global_step, self._base_eval.results or {}, control)
        else:
            self._record_here(
                state.global_step, model, _tokenizer(processing_class, kwargs), control
            )

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        """Every ``every_steps`` steps (in-process mode)."""
        if self.client is not None or self.every_steps is None:
            return
        if state.global_step % self.every_steps == 0:
            self._record_here(
                state.global_step, model, _tokenizer(processing_class, kwargs), control
            )

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        """At each save: on the server (the saved checkpoint), or here when no every_steps."""
        step = state.global_step
        if self.client is not None:
            checkpoint = Path(str(args.output_dir)) / f"checkpoint-{step}"
            self._record(step, self._evaluate_on_server(checkpoint), control)
        elif self.every_steps is None:
            self._record_here(step, model, _tokenizer(processing_class, kwargs), control)
