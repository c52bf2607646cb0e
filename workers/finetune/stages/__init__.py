"""The stages a fine-tune job runs, in order: evaluation, domain, data, ewc (the Fisher),
training, checkpoints, interpolation.

Each stage is a function of what it needs of the running job, the typed
:class:`~workers.finetune.stages.context.StageRun` (``FinetuneRun`` is it), whose
``event``/``warn``/``stage``/``progress`` record progress under the job's lease; the
mechanics they use (training loop, encoding, replay mixing, EWC math, artifacts) live one
level up and know nothing of jobs.
"""
