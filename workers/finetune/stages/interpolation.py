"""Interpolation between the base and the fine-tune (WiSE-FT), and the choice of α.

For a full fine-tune the weights are ``(1 − α)·base + α·tuned``; for LoRA the adapter's
update is scaled by α (``lora_B`` times α, so ``ΔW = α·B·A``). Each α is evaluated in memory
on the general suites and the domain split exactly as checkpoint evaluations are, with the
verdict against the base. The largest passing α is chosen (or, with ``pick=best_domain``, the
passing α with the largest domain gain) and exported as safetensors like any output; the
job's after-evaluation then evaluates that export. Results are kept in the job directory, so
a resumed attempt does not evaluate an α twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workers.engine.loading import attach_adapter, load_model
from workers.finetune.artifacts import TrainingOutcome, save_output
from workers.finetune.stages.checkpoints import CheckpointEvaluator, _gain
from workers.finetune.statefile import read_state, write_json

if TYPE_CHECKING:
    from workers.finetune.stages.context import StageRun

RESULTS = "interpolation.json"
EXPORT = "interpolated"


def choose(results: list[dict[str, Any]], pick: str) -> dict[str, Any] | None:
    """The chosen result: the largest passing α, or the passing α with the best domain gain."""
    passing = [r for r in results if r["verdict"]["verdict"] == "pass"]
    if not passing:
        return None
    if pick == "best_domain":
        return max(passing, key=lambda r: (_gain(r["domain"]), r["alpha"]))
    return max(passing, key=lambda r: r["alpha"])


class _Weights:
    """Sets a loaded model to α between the base and the fine-tune, in place."""

    def __init__(self, run: StageRun, base_dir: Path, output: Path) -> None:
        device = run.device
        if run.request.adapter:
            base = load_model(
                base_dir, device, dtype=torch.float32, quantization=run.request.quantization
            )
            self.model = attach_adapter(base, output)
            self.tuned = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if "lora_B" in n
            }
            self.base: dict[str, torch.Tensor] = {}
        else:
            self.model = load_model(output, device, dtype=torch.float32)
            base = load_model(base_dir, device, dtype=torch.float32)
            self.base = {n: p.detach().clone() for n, p in base.named_parameters()}
            del base
            self.tuned = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def set(self, alpha: float) -> None:
        for name, param in self.model.named_parameters():
            if name not in self.tuned:
                continue
            if self.base:
                param.copy_((1 - alpha) * self.base[name] + alpha * self.tuned[name])
            else:
                param.copy_(alpha * self.tuned[name])


def interpolate(
    run: StageRun,
    base_dir: Path,
    tokenizer: Any,
    fmt: str,
    eval_definitions: list[dict[str, Any]],
    outcome: TrainingOutcome,
) -> tuple[TrainingOutcome, dict[str, Any]]:
    """Sweep the α of ``interpolation.alphas``; export the chosen one; the outcome to ship."""
    spec = run.request.interpolation
    assert spec is not None
    path = run.job_dir / RESULTS
    # Unreadable (torn by an old in-place write): the sweep starts over; the adapter is intact.
    state = read_state(path)
    if state is None or not isinstance(state.get("results"), list):
        state = {"results": []}
    if "chosen_alpha" in state:
        return _shipped(outcome, state), state
    done = {r["alpha"] for r in state["results"]}
    # From the final weights of the training, even when the guard shipped an earlier step.
    trained = outcome.metrics.get("final_output_path") or outcome.output_path
    assert trained is not None, "a guard that shipped nothing keeps final_output_path"
    tuned = Path(trained)
    weights = _Weights(run, base_dir, tuned)
    evaluator = CheckpointEvaluator(run, weights.model, tokenizer, fmt, eval_definitions, 0)
    evaluator.phase = "interpolation evaluations"
    pending = [alpha for alpha in spec.alphas if alpha not in done]
    run.tracker.resize(evaluator.phase, len(pending) * evaluator.items)
    for alpha in sorted(spec.alphas):
        if alpha in done:
            continue
        run.stage(f"interpolation: evaluating α = {alpha:g}", phase=evaluator.phase)
        weights.set(alpha)
        figures, _ = evaluator.measure(0)
        result = {"alpha": alpha, **figures}
        state["results"].append(result)
        write_json(path, state)
        run.event(
            f"interpolation α = {alpha:g}: general accuracy {figures['general']['accuracy']}, "
            f"verdict {figures['verdict']['verdict']}",
            data=result,
        )
    state["results"].sort(key=lambda r: r["alpha"])
    chosen = choose(state["results"], spec.pick)
    if chosen is None:
        state.update(
            chosen_alpha=None,
            output_path=outcome.output_path,
            reason="no α passes the gate: "
            + (
                "shipped the fine-tune as trained"
                if outcome.output_path is not None
                else "nothing shipped (no checkpoint passed the guard either)"
            ),
        )
    elif chosen["alpha"] == 1.0:
        state.update(
            chosen_alpha=1.0,
            output_path=str(tuned),
            reason="α = 1 (the fine-tune as trained) passes the gate",
        )
    else:
        weights.set(chosen["alpha"])
        out = run.job_dir / EXPORT
        run.stage(f"interpolation: exporting α = {chosen['alpha']:g}")
        save_output(weights.model, tokenizer, run.request, base_dir, out)
        rule = "the largest α" if spec.pick == "largest" else "the largest domain gain"
        state.update(
            chosen_alpha=chosen["alpha"],
            output_path=str(out),
            reason=f"α = {chosen['alpha']:g}: {rule} that passes the gate",
        )
    write_json(path, state)
    run.event(
        f"interpolation: chose α = {state['chosen_alpha']} ({state['reason']})",
        data={k: v for k, v in state.items() if k != "results"},
        output_path=state["output_path"],
    )
    del weights, evaluator
    return _shipped(outcome, state), state


def _shipped(outcome: TrainingOutcome, state: dict[str, Any]) -> TrainingOutcome:
    metrics = {
        **outcome.metrics,
        "interpolation": {
            "results": [
                {k: r[k] for k in ("alpha", "general", "domain", "verdict")}
                for r in state["results"]
            ],
            "chosen_alpha": state["chosen_alpha"],
            "reason": state["reason"],
            "trained_output_path": outcome.metrics.get("final_output_path") or outcome.output_path,
        },
    }
    return TrainingOutcome(
        output_path=state["output_path"],
        trainable_parameters=outcome.trainable_parameters,
        metrics=metrics,
        warnings=outcome.warnings,
    )
