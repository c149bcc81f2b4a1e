"""Run a reference and a candidate model over the same data, then time them."""

from __future__ import annotations

import numpy as np

from . import runtime
from .config import EvalOptions
from .data import Dataset
from .errors import DataError
from .evaluation import Latency, OutputStats, Report


def run_pair(reference, candidate, ds: Dataset, labels: np.ndarray | None, options: EvalOptions,
             limit: int | None, size_ref: int, size_cand: int, task=None) -> Report:
    choice = runtime.pick_provider(options.provider)
    notes = [choice.note] if choice.note else []
    if choice.requested == "cuda":
        notes.append("onnxruntime's CUDA EP has no QDQ fusion and no QLinearConv/QLinearMatMul: int8 Conv/MatMul "
                     "run there as float ops wrapped in Q/DQ (expect no speed-up); int8 on NVIDIA GPUs needs the "
                     "TensorRT EP, and on CUDA the gains are fp16 and int4 weight-only MatMulNBits")
    sess_r = runtime.session(str(reference), choice.used, options.threads)
    sess_c = runtime.session(str(candidate), choice.used, options.threads)
    provider = runtime.used_providers(sess_c)[0]
    if choice.used != provider:
        notes.append(f"{choice.used} could not be created (missing CUDA/cuDNN libraries or no GPU); "
                     f"falling back to CPU: ran on {provider}")
    inputs = [i.name for i in sess_r.get_inputs()]
    names = runtime.output_names(sess_r)
    stats = {n: OutputStats(n) for n in names}
    correct_r = correct_c = seen = 0
    first = None
    rows_r, rows_c = [], []
    for batch in ds.batches(options.batch_size, limit):
        feeds = {k: batch[k] for k in inputs}
        first = first or feeds
        out_r = runtime.run(sess_r, feeds)
        out_c = runtime.run(sess_c, feeds)
        for name, a, b in zip(names, out_r, out_c):
            stats[name].update(a, b)
        if task is not None:
            rows_r.append(np.asarray(task.reduce(dict(zip(names, out_r)), batch)))
            rows_c.append(np.asarray(task.reduce(dict(zip(names, out_c)), batch)))
        if labels is not None:
            y = labels[seen:seen + len(out_r[0])]
            classes = out_r[0].reshape(len(y), -1).shape[1]
            if y.size and y.max() >= classes:
                raise DataError(f"label {int(y.max())} is outside the model's {classes} classes "
                                f"(output {names[0]!r}); give labels 0..{classes - 1}")
            correct_r += int((out_r[0].reshape(len(y), -1).argmax(1) == y).sum())
            correct_c += int((out_c[0].reshape(len(y), -1).argmax(1) == y).sum())
        seen += len(out_r[0])
    lat_r, lat_c = runtime.time_pair(sess_r, sess_c, first, options.warmup, options.repeats)
    batch = len(next(iter(first.values())))
    acc_r = correct_r / seen if labels is not None else None
    acc_c = correct_c / seen if labels is not None else None
    task_scores = (None, None, None)
    if task is not None:
        task_scores = (task.name, float(task.score(np.concatenate(rows_r))), float(task.score(np.concatenate(rows_c))))
    return Report(str(reference), str(candidate), seen, provider, tuple(s.result() for s in stats.values()),
                  size_ref, size_cand, Latency(lat_r.median_ms, lat_r.p90_ms, lat_r.runs, batch),
                  Latency(lat_c.median_ms, lat_c.p90_ms, lat_c.runs, batch), acc_r, acc_c,
                  options.threads, (), tuple(notes), *task_scores)
