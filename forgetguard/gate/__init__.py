"""``forgetguard gate``: the CI step that fails when fine-tuning made a model forget.

``options`` (what it was asked, and the requests derived from it), ``run`` (submit, wait,
compare through :class:`forgetguard.Client`), ``reports`` (console, JUnit, Markdown) and
``progress`` (how a wait shows itself with or without a terminal).
"""

from forgetguard.gate.options import (
    GateError,
    GateOptions,
    compare_params,
    evaluation_body,
    noise_floor_body,
    parse_suites,
)
from forgetguard.gate.run import EXIT_ERROR, EXIT_FAIL, EXIT_PASS, run_gate

__all__ = [
    "EXIT_ERROR",
    "EXIT_FAIL",
    "EXIT_PASS",
    "GateError",
    "GateOptions",
    "compare_params",
    "evaluation_body",
    "noise_floor_body",
    "parse_suites",
    "run_gate",
]
