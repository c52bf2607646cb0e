"""forgetguard for users: a Python client (``Client``) and a transformers ``TrainerCallback``.

This package imports only ``httpx`` and ``pydantic`` (the callback, imported on its own from
``forgetguard.callback``, also needs ``transformers``); the server lives in ``app`` and the
workers in ``workers``.
"""

from forgetguard.client import (
    Client,
    Comparison,
    Evaluation,
    FinetuneJob,
    ForgetguardError,
    JobFailed,
    ProblemError,
    Progress,
    Unreachable,
)

__all__ = [
    "Client",
    "Comparison",
    "Evaluation",
    "FinetuneJob",
    "ForgetguardError",
    "JobFailed",
    "ProblemError",
    "Progress",
    "Unreachable",
]
