"""The stages a fine-tune job runs, in order: evaluation, domain, data, ewc (the Fisher),
training, checkpoints, interpolation.

Each stage is a function of the running job (:class:`workers.finetune.job.FinetuneRun`), whose
``event``/``warn``/``stage`` record progress under the job's lease; the mechanics they use
(training loop, encoding, replay mixing, EWC math, artifacts) live one level up and know
nothing of jobs.
"""
