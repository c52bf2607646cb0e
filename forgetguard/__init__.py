"""forgetguard for users: a Python client (``Client``), the CI gate and a ``TrainerCallback``.

This is the client package: it imports nothing of the server, and installs alone
(``pip install ./client``). ``import forgetguard`` needs only ``httpx`` and ``pydantic``; the
commands (``forgetguard.cli``: gate, evaluate, compare, finetune, status) add ``typer`` and
``rich``; the callback, imported on its own from ``forgetguard.callback``, needs
``transformers``. The server lives in ``app`` and the workers in ``workers``.
"""

from forgetguard.client import (
    Client,
    Comparison,
    Evaluation,
    EvaluationGroup,
    FinetuneJob,
    ForgetguardError,
    JobFailed,
    MalformedResponse,
    ProblemError,
    Progress,
    Timeout,
    Unreachable,
)
from forgetguard.rules import CompareRules

__all__ = [
    "Client",
    "CompareRules",
    "Comparison",
    "Evaluation",
    "EvaluationGroup",
    "FinetuneJob",
    "ForgetguardError",
    "JobFailed",
    "MalformedResponse",
    "ProblemError",
    "Progress",
    "Timeout",
    "Unreachable",
]
