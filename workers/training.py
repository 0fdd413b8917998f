"""Fine-tuning jobs, run by a training worker (`python -m workers --train`) of the base model.

A training worker consumes only its model's `<slug>.train` queue, one job at a time, so training
never takes an inference worker's model thread. For each job it reads the training series from
the job store, holds out the last `prediction_length` points of each (with `validation`), runs
`Chronos2Pipeline.fit` on a copy of the base model, and reports every step (loss, progress) to the
job's record; a cancel request or the MAX_JOB_S deadline stops training at the next step.

What a job leaves is published whole or not at all: the weights are written under a staging
directory, scored, renamed into the model store with their manifest (shared/model_store.py), and
only then registered in Redis, where the API finds them. A worker killed mid-training leaves its
message unacked; the reaper of any worker of the model gives it back, and the next delivery
starts training over (clearing its predecessors' staging directories), within MAX_DELIVERIES: the
job is marked in a "pass" for its whole training, so a job that kills its worker every time ends
failed. A run whose job a later delivery claimed (a holder taken for dead that still runs) stops at
its next step, and lists no model: each step and the registration check the claim's `attempts`
(the registration in the same script that writes it, lua/register.lua). The run that holds the job
to its end decides what stays: when the job does not succeed, no model of it stays listed or
stored, whichever run of it made one.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence

import numpy as np
import torch
from chronos import BaseChronosPipeline
from transformers import TrainerCallback

from shared import model_store
from shared.catalog import ModelSpec
from shared.schemas import FinetuneParameters
from shared.series import Decoded, decode
from shared.settings import Settings
from shared.store import JobRecord, JobStatus, JobStore

from workers.runtime import pick_device
from workers.weights import Weights

log = logging.getLogger(__name__)

# Levels the validation scores (WQL) are computed over.
SCORED_LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


class Trainer:
    """The base model a training worker fine-tunes copies of, loaded once, in float32 (training in
    bfloat16 weights would lose the small updates)."""

    def __init__(self, spec: ModelSpec, weights: Weights, settings: Settings):
        self.spec, self.weights, self.settings = spec, weights, settings
        self.device = pick_device(settings.device)
        started = time.perf_counter()
        self.pipeline = BaseChronosPipeline.from_pretrained(weights.path, device_map=self.device, dtype=torch.float32)
        self.load_s = time.perf_counter() - started
        log.info("training worker of %s: %s weights on %s, loaded in %.1fs", spec.id, weights.kind, self.device,
                 self.load_s)  # fmt: skip


def execute(job_ids: Sequence[str], trainer: Trainer, store: JobStore, worker: str) -> list[str]:
    """Run the fine-tuning jobs of one message, one after the other; returns their final statuses."""
    statuses = []
    for job_id, (state, record, _) in zip(job_ids, store.start(trainer.spec, job_ids, worker), strict=True):
        if state != JobStatus.RUNNING or record is None:
            log.info("job %s: not runnable (%s), skipped", job_id, state)
            statuses.append(state)
            continue
        fields: dict = {"weights": trainer.weights.kind, "inference_s": 0.0}
        try:
            status = _train(record, trainer, store, fields)
        except Exception as exc:  # a job that cannot be trained fails, not the worker
            log.exception("job %s: fine-tuning failed", job_id)
            fields["error"] = f"{type(exc).__name__}: {exc}"
            status = JobStatus.FAILED
        finally:
            shutil.rmtree(
                model_store.staging(trainer.settings.model_store, job_id, record.attempts), ignore_errors=True
            )
        (final,) = store.finish([(record, status, fields)])
        # This run held the job to its end, which did not succeed (cancelled at the last moment, say):
        # no model of the job stays, this run's or a superseded earlier run's that registered one
        # before this run's claim. Only then: `superseded` leaves it to the later run, and `missing`
        # (the record expired; lua/finish.lua answers it before checking the claim) may be a run
        # taken for dead long after a later one succeeded.
        if final in (JobStatus.FAILED, JobStatus.CANCELLED):
            name = model_store.model_id(trainer.spec, job_id)
            store.forget_finetuned(name)
            model_store.delete(trainer.settings.model_store, name)
        log.info("job %s: %s (%.1fs of training)", job_id, final, fields["inference_s"])
        statuses.append(final)
    return statuses


class _Steps(TrainerCallback):
    """Reports each step to the job's record and stops training on a cancel request or the deadline."""

    def __init__(self, store: JobStore, record: JobRecord, mode: str, deadline: float):
        self.store, self.record, self.mode, self.deadline = store, record, mode, deadline
        self.losses: list[float] = []
        self.stopped: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_step_end(self, args, state, control, **kwargs):
        record = {"mode": self.mode, "losses": self.losses}
        # A run a later delivery's claim took over stops here too; its finish is answered `superseded`.
        if self.store.training_step(self.record.id, self.record.attempts, state.global_step, record):
            self.stopped, control.should_training_stop = "cancelled", True
        elif time.monotonic() > self.deadline:
            self.stopped, control.should_training_stop = "deadline", True
        return control


def _train(record: JobRecord, trainer: Trainer, store: JobStore, fields: dict) -> JobStatus:
    """One fine-tuning run and its outcome; a model it made is stored and listed (`fields` says which)."""
    settings, spec = trainer.settings, trainer.spec
    params = FinetuneParameters.model_validate(record.request["parameters"])
    series = [decode(element) for element in store.inputs(record.id)]
    if not series:
        raise RuntimeError(f"job {record.id}: its series are no longer stored")
    horizon = params.prediction_length
    held_out = horizon if params.validation else 0
    staged = model_store.staging(settings.model_store, record.id, record.attempts)
    for earlier in range(1, record.attempts):  # a dead predecessor's leftovers (or a superseded run's)
        shutil.rmtree(model_store.staging(settings.model_store, record.id, earlier), ignore_errors=True)
    staged.mkdir(parents=True)
    steps = _Steps(store, record, params.finetune_mode, time.monotonic() + settings.max_job_s)
    store.mark_in_pass([(record.id, record.attempts, 0)])  # from here, this worker's death counts against the job
    started = time.perf_counter()
    tuned = trainer.pipeline.fit(
        [_task(s, len_minus=held_out) for s in series], prediction_length=horizon,
        finetune_mode=params.finetune_mode, context_length=params.context_length, learning_rate=params.rate(),
        num_steps=params.num_steps, batch_size=params.batch_size, output_dir=str(staged),
        finetuned_ckpt_name=model_store.WEIGHTS, callbacks=[steps], remove_printer_callback=True,
        report_to=[], logging_steps=1, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    fields["inference_s"] = round(time.perf_counter() - started, 3)
    fields["progress_done"] = len(steps.losses)
    training: dict = {"mode": params.finetune_mode, "losses": steps.losses}
    fields["finetune"] = training
    if steps.stopped == "cancelled":
        return JobStatus.CANCELLED
    if steps.stopped == "deadline":
        fields["error"] = f"TimeoutError: training not finished within MAX_JOB_S={settings.max_job_s}s"
        return JobStatus.FAILED
    if held_out:
        training["metrics"] = {
            "base": score(trainer.pipeline, series, horizon, params.context_length),
            "finetuned": score(tuned, series, horizon, params.context_length),
        }
    name = model_store.model_id(spec, record.id)
    manifest = {
        "id": name, "base_model": spec.id, "base_revision": trainer.weights.revision, "weights": trainer.weights.kind,
        "owner": record.owner, "job_id": record.id, "mode": params.finetune_mode, "created_at": time.time(),
        "prediction_length": horizon, "context_length": params.context_length, "steps": len(steps.losses),
        "metrics": training.get("metrics"), "attempt": record.attempts,
    }  # fmt: skip
    # A later delivery's run makes the job's model: no files of this one are put in its place...
    if not store.holds(record.id, record.attempts):
        return JobStatus.CANCELLED
    model_store.publish(staged, model_store.path(settings.model_store, name), manifest)
    # ...nor listed, if its claim landed since (the check and the listing in one script).
    if not store.register_finetuned(name, manifest, record.id, record.attempts):
        model_store.delete(settings.model_store, name, attempt=record.attempts)
        return JobStatus.CANCELLED
    training["finetuned_model"] = name
    return JobStatus.SUCCEEDED


def _task(series: Decoded, len_minus: int = 0) -> dict:
    """A stored series as `fit` and `predict` take it, without its last `len_minus` points."""
    end = series.target.shape[1] - len_minus
    target = series.target[:, :end]
    task: dict = {"target": target[0] if target.shape[0] == 1 else target}
    if series.past:
        task["past_covariates"] = {name: values[:end] for name, values in series.past.items()}
    return task


def score(pipeline, series: Sequence[Decoded], horizon: int, context_length: int | None) -> dict:
    """WQL and MASE of `pipeline`'s forecasts of each series' last `horizon` points from the points
    before them, over every target variate: WQL over levels 0.1…0.9, `2·Σ pinball / (|Q|·Σ|y|)`;
    MASE, the median's mean absolute error over the one-step naive forecast's in the context."""
    with torch.inference_mode():
        quantiles, _ = pipeline.predict_quantiles(
            [_task(s, len_minus=horizon) for s in series], prediction_length=horizon,
            quantile_levels=SCORED_LEVELS, context_length=context_length,
        )  # fmt: skip
    loss = total = 0.0
    errors, naive = [], []
    for s, q in zip(series, quantiles, strict=True):
        q = q.to(torch.float64).numpy()  # [variates, horizon, levels]
        actual = s.target[:, -horizon:].astype(np.float64)
        seen = ~np.isnan(actual)
        for j, level in enumerate(SCORED_LEVELS):
            diff = np.where(seen, actual - q[:, :, j], 0.0)
            loss += float(np.sum(np.maximum(level * diff, (level - 1) * diff)))
        total += float(np.abs(actual[seen]).sum())
        errors.append(np.abs(actual - q[:, :, SCORED_LEVELS.index(0.5)])[seen])
        history = s.target[:, :-horizon].astype(np.float64)
        steps = np.abs(np.diff(history, axis=1))
        naive.append(steps[~np.isnan(steps)])
    mae, scale = float(np.concatenate(errors).mean()), float(np.concatenate(naive).mean())
    return {
        "wql": _finite(2 * loss / (len(SCORED_LEVELS) * total)) if total else None,
        "mase": _finite(mae / scale) if scale else None,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
