"""Process-wide settings for a process that runs models, applied by its entry point.

Importing anything under ``workers/`` leaves the environment alone. The commands that start a
worker or the demo (``app.cli``) call :func:`configure_process` first, before torch, transformers
or huggingface_hub is imported: those read the variables once, when they load.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import MutableMapping

# Never reach the hub: models come from local directories only (``local_files_only=True`` is
# passed as well; these also stop the libraries' own update and telemetry calls).
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# No progress bars (transformers 5 draws one for every model load): workers write logs, and a
# bar per evaluation or checkpoint drowns the lines that matter.
QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# Idle OpenMP threads sleep instead of spinning. Spinning threads starve the other processes
# on a shared CPU (measured: tiny-model training 40x slower on 2 cores); sleeping costs
# nothing when the process is alone.
THREADS = {"OMP_WAIT_POLICY": "PASSIVE"}
# vLLM, read when it is imported: forgetguard's logging stays in charge, and the engine core
# runs in this process, so a worker stopped by a signal (or os._exit after its grace period)
# leaves no engine process behind. Harmless where vLLM is never imported.
VLLM = {"VLLM_CONFIGURE_LOGGING": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def configure_process(
    device: str = "auto", *, environ: MutableMapping[str, str] | None = None
) -> str:
    """Set this process's offline, logging and thread settings; return the device to run on.

    Values already in the environment win (an operator may export ``OMP_WAIT_POLICY=ACTIVE``).
    ``cuda:N`` pins the process to GPU N through ``CUDA_VISIBLE_DEVICES``, so torch sees that
    GPU as ``cuda:0``, which is returned; any other device comes back unchanged.
    """
    env = os.environ if environ is None else environ
    for name, value in {**OFFLINE, **QUIET, **THREADS, **VLLM}.items():
        env.setdefault(name, value)
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        return "cuda:0"
    return device


# Exit status of a worker that cannot start at all (`forgetguard serve` backs off and says why).
CANNOT_START_EXIT = 3
# Engines that live outside the main environment, and how to get them.
ENGINE_MODULES = {"vllm": "vllm"}


def engine_missing(backend: str, detail: str | None = None) -> str | None:
    """Why a worker of ``backend`` cannot start here (its engine is not importable), or None.

    Asked before torch is imported, so a failed start costs a second, not the imports.
    ``detail``: the import error already met, if any.
    """
    module = ENGINE_MODULES.get(backend)
    if module is None or (detail is None and importlib.util.find_spec(module) is not None):
        return None
    return (
        f"backend {backend!r} is not installed in this environment "
        f"({detail or f'No module named {module!r}'}); vLLM lives in a venv of its own: "
        "`make vllm`, then run `.venv-vllm/bin/forgetguard serve --backend vllm` "
        "(see README: vLLM)"
    )
