"""Run a reference and a candidate model over the same data, then time them and count the
kernels onnxruntime runs for each."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import runtime
from .config import EvalOptions
from .data import Dataset
from .errors import DataError
from .evaluation import Latency, OutputStats, Report, Speedup, class_scores, is_classifier_output

# kernel counts save onnxruntime's optimised graph, weights included, to a temporary folder:
# not for models larger than this on disk
KERNEL_COUNT_MAX_BYTES = 1 << 30


def fixed_batch(sess) -> int | None:
    """The batch a model's inputs fix (the first input whose first dimension is a positive
    integer), the same rule as ``qtool.api._batch_size``; None when the batch is free."""
    for i in sess.get_inputs():
        shape = i.shape or []
        if shape and isinstance(shape[0], int) and not isinstance(shape[0], bool) and shape[0] > 0:
            return shape[0]
    return None


class Comparison:
    """Two models' outputs on the same batches, folded in one batch at a time: per-output error
    statistics, accuracy against ``labels`` (read from the first classifier-shaped output, see
    ``evaluation.is_classifier_output``) and the task's rows. ``labels_given``: the labels were
    asked for (--labels), so a model without a classifier-shaped output is an error, else a note.
    ``qtool eval`` and the search's candidates (against cached fp32 outputs) both use it."""

    def __init__(self, names: list[str], labels: np.ndarray | None, task=None, labels_given: bool = True):
        self.names, self.labels, self.task, self.labels_given = names, labels, task, labels_given
        self.stats = {n: OutputStats(n) for n in names}
        self.correct_r = self.correct_c = self.seen = 0
        self.head = None  # index of the output accuracy is read from
        self.rows_r, self.rows_c = [], []
        self.notes: list[str] = []

    def update(self, batch: dict, out_r: list, out_c: list, n: int) -> None:
        """One batch of ``n`` samples (counted on the inputs: an output may be a scalar or not batch-major)."""
        names = self.names
        for name, a, b in zip(names, out_r, out_c):
            self.stats[name].update(a, b, n)
        if self.task is not None:
            self.rows_r.append(self.task.rows(dict(zip(names, out_r)), batch))
            self.rows_c.append(self.task.rows(dict(zip(names, out_c)), batch))
        if self.labels is not None and self.head is None:
            self.head = next((i for i, (name, a) in enumerate(zip(names, out_r))
                              if is_classifier_output(name, a) and len(a) == n), -1)
            if self.head < 0:
                shapes = ", ".join(f"{name} {list(a.shape)} {a.dtype}" for name, a in zip(names, out_r))
                if self.labels_given:
                    raise DataError(f"labels need a classifier-shaped output (float [batch, classes>=2] or "
                                    f"[batch, 1, classes]) and the model has none ({shapes}); drop --labels, "
                                    "or gate with --task")
                self.notes.append(f"the data's labels were not used: no classifier-shaped output ({shapes})")
                self.labels = None
        if self.labels is not None:
            y = self.labels[self.seen:self.seen + n]
            scores_r, scores_c = class_scores(out_r[self.head]), class_scores(out_c[self.head])
            classes = scores_r.shape[1]
            if y.size and y.max() >= classes:
                raise DataError(f"label {int(y.max())} is outside the model's {classes} classes "
                                f"(output {names[self.head]!r}); give labels 0..{classes - 1}")
            self.correct_r += int((scores_r.argmax(1) == y).sum())
            self.correct_c += int((scores_c.argmax(1) == y).sum())
        self.seen += n

    def fields(self) -> dict:
        """The Report fields these batches give: samples, outputs, accuracies and the task's scores."""
        d = {"samples": self.seen, "outputs": tuple(s.result() for s in self.stats.values())}
        if self.labels is not None:
            d.update(accuracy_reference=self.correct_r / self.seen, accuracy_candidate=self.correct_c / self.seen)
        if self.task is not None:
            d["task"] = self.task.name
            d["task_reference"], d["task_candidate"] = self.task.evaluate(self.rows_r, self.rows_c)
        return d


def samples_in(feeds: dict) -> int:
    """A batch's number of samples, counted on its inputs."""
    return len(next(iter(feeds.values()))) if feeds else 1


def run_pair(reference, candidate, ds: Dataset, labels: np.ndarray | None, options: EvalOptions,
             limit: int | None, size_ref: int, size_cand: int, task=None,
             labels_given: bool = True) -> Report:
    """Both models over ``ds``: per-output metrics, accuracy against ``labels`` (read from the
    first classifier-shaped output, see ``evaluation.is_classifier_output``), the task metric,
    paired timing and kernel counts. ``labels_given``: the labels were asked for (--labels);
    then a model without a classifier-shaped output is an error, else a note."""
    choice = runtime.pick_provider(options.provider)
    notes = [choice.note] if choice.note else []
    if choice.requested == "cuda":
        notes.append("onnxruntime's CUDA EP has no QDQ fusion and no QLinearConv/QLinearMatMul: int8 Conv/MatMul "
                     "run there as float ops wrapped in Q/DQ (expect no speed-up); int8 on NVIDIA GPUs needs the "
                     "TensorRT EP, and on CUDA the gains are fp16 and int4 weight-only MatMulNBits")
    if runtime.emulates(choice):
        notes.append("a TensorRT target on the CPU EP: both models ran with onnxruntime's CPU QDQ fusions off, so "
                     "each Q/DQ pair is computed as written, as TensorRT's int8 kernels compute it (the fused CPU "
                     "kernels saturate full 8-bit weights on x86 without VNNI); the latency is not TensorRT's")
    disabled = runtime.disabled_for(choice)
    sess_r = runtime.target_session(str(reference), choice, options.threads)
    sess_c = runtime.target_session(str(candidate), choice, options.threads)
    started = {"reference": runtime.used_providers(sess_r)[0], "candidate": runtime.used_providers(sess_c)[0]}
    provider = started["candidate"]
    if choice.used != provider:
        notes.append(f"{choice.used} could not be created for this model; ran on {provider}")
    inputs = [i.name for i in sess_r.get_inputs()]
    batch_size = fixed_batch(sess_r) or options.batch_size
    comparison = Comparison(runtime.output_names(sess_r), labels, task, labels_given)
    first = None
    for batch in ds.batches(batch_size, limit):
        feeds = {k: batch[k] for k in inputs}
        first = first or feeds
        comparison.update(batch, runtime.run(sess_r, feeds), runtime.run(sess_c, runtime.typed_feeds(sess_c, feeds)),
                          samples_in(feeds))
    notes += comparison.notes
    lat_r, lat_c, ratios = runtime.time_pair(sess_r, sess_c, first, options.warmup, options.repeats)
    # onnxruntime's Python API moves a session to its fallback providers (the CPU EP) when an EP fails
    # during a run, with only a print: the EP that ran is read again after the runs
    for which, sess in (("reference", sess_r), ("candidate", sess_c)):
        now = runtime.used_providers(sess)[0]
        if now != started[which]:
            notes.append(f"the {which} left {started[which]} during the runs (onnxruntime fell back after an EP "
                         f"failure): it finished on {now}")
    provider = runtime.used_providers(sess_c)[0]
    batch = samples_in(first) if first else 1
    from .profile import node_placement
    kernels, placement = [], []
    for path, size in ((reference, size_ref), (candidate, size_cand)):
        # each needs a session of its own that writes or profiles the whole graph: skipped for big models
        if size > KERNEL_COUNT_MAX_BYTES:
            counts, note = None, (f"{Path(path).name}: kernel counts skipped, the model is {size / 1e9:.2f} GB and "
                                  "onnxruntime would write its optimised graph with every weight to a temporary folder")
            placed = None
        else:
            counts, note = runtime.kernel_counts(str(path), choice.used, options.threads, disabled)
            placed = node_placement(str(path), choice.used, first, options.threads, disabled) if first else None
        kernels.append(counts)
        placement.append(placed)
        if note:
            notes.append(note)
    off = {ep: ops for ep, ops in (placement[1] or {}).items() if ep != choice.used}
    if off:
        from .evaluation import describe_placement
        notes.append(f"not every candidate kernel ran on {choice.used}: {describe_placement(off)}")
    return Report(reference=str(reference), candidate=str(candidate), provider=provider, size_reference=size_ref,
                  target=choice.requested, placement_reference=placement[0], placement_candidate=placement[1],
                  size_candidate=size_cand, latency_reference=Latency(lat_r.median_ms, lat_r.p90_ms, lat_r.runs, batch),
                  latency_candidate=Latency(lat_c.median_ms, lat_c.p90_ms, lat_c.runs, batch),
                  threads=options.threads, notes=tuple(notes), paired_speedup=Speedup.from_ratios(ratios),
                  kernels_reference=kernels[0], kernels_candidate=kernels[1], **comparison.fields())
