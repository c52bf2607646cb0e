"""A ``transformers.TrainerCallback`` that watches forgetting while you train.

Works with ``Trainer``, TRL's ``SFTTrainer`` and anything else that accepts Hugging Face
callbacks. Every ``every_steps`` optimizer steps (or at each save) it evaluates the model on
general suites, records the forgetting curve (``callback.curve``), and stops training
(``control.should_training_stop``) when general accuracy has fallen more than ``max_drop``
below the base model's — the guard of a forgetguard fine-tune job, in your own loop:

    from forgetguard.callback import ForgetGuardCallback

    guard = ForgetGuardCallback(every_steps=50, max_drop=0.05)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[guard])
    trainer.train()
    print(guard.curve, guard.stopped_at)

Two ways to evaluate:

* in-process (default): the live model, through the forgetguard worker engine (needs the
  ``worker`` extra: torch, transformers). Suites are built-in names (``general-qa`` …) or
  suite dicts; ``max_items`` keeps each evaluation short.
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
        max_drop: float | None = None,
        prompt_format: str | None = None,
        max_new_tokens: int = 50,
        client: Client | None = None,
        base_model: str | None = None,
        threshold: float = 0.10,
    ) -> None:
        if every_steps is not None and every_steps < 1:
            raise ValueError("every_steps must be at least 1 (or None to evaluate at each save)")
        if client is not None and base_model is None:
            raise ValueError("a server-side guard needs base_model: the path the server reads")
        self.every_steps = every_steps
        self.max_drop = max_drop
        self.prompt_format = prompt_format
        self.max_new_tokens = max_new_tokens
        self.client = client
        self.base_model = base_model
        self.threshold = threshold
        self.suites = [self._definition(s, max_items) for s in suites]
        self.curve: list[dict[str, Any]] = []
        self.stopped_at: int | None = None
        self.stop_reason: str | None = None
        self._base_eval: Evaluation | None = None

    @staticmethod
    def _definition(suite: str | Mapping[str, Any], max_items: int | None) -> dict[str, Any]:
        definition = builtin_suite(suite) if isinstance(suite, str) else dict(suite)
        if max_items is not None and len(definition["items"]) > max_items:
            definition = {
                **definition,
                "name": f"{definition['name']}-first{max_items}",
                "items": definition["items"][:max_items],
            }
        return definition

    # ------------------------------------------------------------------ in-process

    def _evaluate_here(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        from workers.evaluation.memory import evaluate_suites

        was_training = model.training
        model.eval()
        try:
            return evaluate_suites(
                model,
                tokenizer,
                self.suites,
                prompt_format=self.prompt_format,
                max_new_tokens=self.max_new_tokens,
            )
        finally:
            if was_training:
                model.train()

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
        comparison = self.client.compare(self._base_eval.id, after.id, threshold=self.threshold)
        results = dict(after.results or {})
        results["_comparison"] = {
            "evaluation_id": after.id,
            "verdict": comparison.verdict,
            "accuracy_drop": comparison.accuracy_drop,
        }
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
        self._record(step, self._evaluate_here(model, tokenizer), control)

    def _record(self, step: int, results: Mapping[str, Any], control: TrainerControl) -> None:
        general = self._general(results)
        base = self.curve[0]["general"] if self.curve else general
        drop = None
        if "accuracy" in general and "accuracy" in base:
            drop = base["accuracy"] - general["accuracy"]
        point = {"step": step, "general": general, "drop": drop, "results": dict(results)}
        self.curve.append(point)
        log.info("forgetguard: step %d general %s drop %s", step, general, drop)
        if step > 0 and self.max_drop is not None and drop is not None and drop > self.max_drop:
            self.stopped_at = step
            self.stop_reason = (
                f"general accuracy fell {drop:.3f} below the base "
                f"({base['accuracy']:.3f} → {general['accuracy']:.3f}), more than "
                f"max_drop {self.max_drop:g}"
            )
            control.should_training_stop = True

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
