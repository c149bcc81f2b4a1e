"""Subprocess harness shared by the benchmark scripts (standard library only).

A benchmark script re-runs itself as ``script.py --worker JSON`` for every measurement, so that each
measurement's peak RSS is its own. The worker side (``worker_main``) applies RLIMIT_AS, runs one
worker function and prints one ``RESULT {json}`` line; the parent side (``spawn``) starts the worker,
watches its RSS (and optionally a timeout) and reads that line back. How a script words a failure
stays in the script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

MiB = 1024 * 1024
GiB = 1024 * MiB


# ------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------

def status_kib(name: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in KiB; 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def peak_mib() -> dict:
    """This process's peak RSS: ru_maxrss (counts the parent's RSS at fork) and VmHWM, in MiB."""
    import resource
    return {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "vmhwm_mib": status_kib("VmHWM") / 1024}


def worker_main(spec_json: str, workers: dict[str, Callable[[dict], dict]], *, key: str,
                memory_error: str, over_prefix: str, over_words: tuple[str, ...],
                peak_always: bool = False, traceback_env: str | None = None) -> None:
    """Run ``workers[spec[key]](spec)`` under RLIMIT_AS ``spec["as_limit"]`` and print its result as one
    ``RESULT {json}`` line. A MemoryError gives status ``memory_error``; another exception
    ``over_prefix`` + its text when the text names one of ``over_words``, else ``"error: "`` + text.
    Peak RSS (``peak_mib``) is added after a failure, or always with ``peak_always``; with
    ``traceback_env`` set in the environment a failure's traceback goes to stderr."""
    import resource
    spec = json.loads(spec_json)
    if spec.get("as_limit"):
        resource.setrlimit(resource.RLIMIT_AS, (spec["as_limit"], spec["as_limit"]))
    failed = True
    try:
        res = {"status": "ok", **workers[spec[key]](spec)}
        failed = False
    except MemoryError:
        res = {"status": memory_error}
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        msg = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"
        over = any(s in text.lower() for s in over_words)
        res = {"status": (over_prefix if over else "error: ") + text}
        if traceback_env and os.environ.get(traceback_env):
            import traceback
            traceback.print_exc()
    if failed or peak_always:
        res.update(peak_mib())
    sys.stdout.flush()
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------
# parent side
# ------------------------------------------------------------------------------------------

def mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (8 GiB if it cannot be read)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * GiB


def worker_env(threads: int, **extra: str) -> dict:
    """The environment of a worker: BLAS/OpenMP pools at ``threads``, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", **extra)


@dataclass
class Spawned:
    result: dict | None          # the worker's RESULT line, None if it printed none
    wall: float                  # seconds
    returncode: int
    stderr: str
    killed: dict = field(default_factory=dict)   # {"rss": bytes} or {"timeout": True}


def spawn(script: str | Path, spec: dict, *, env: dict, cwd: str | Path, rss_limit: int,
          timeout: float | None = None, poll: float = 0.1, log: Path | None = None,
          new_session: bool = False) -> Spawned:
    """Run ``script --worker JSON(spec)``; kill it (its process group with ``new_session``) once its
    RSS exceeds ``rss_limit`` bytes or it runs past ``timeout`` seconds. stderr goes to ``log`` when
    given (and is read back from it), else to a pipe."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    errf = open(log, "w") if log is not None else None
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf if errf else subprocess.PIPE, text=True,
                                env=env, cwd=cwd, start_new_session=new_session)
        killed: dict = {}

        def kill() -> None:
            if new_session:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGKILL)

        def watch() -> None:
            while proc.poll() is None:
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        rss = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:")), 0)
                except (OSError, StopIteration):
                    rss = 0
                if rss > rss_limit:
                    killed["rss"] = rss
                    kill()
                    return
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    killed["timeout"] = True
                    kill()
                    return
                time.sleep(poll)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        out, err = proc.communicate()
        t.join()
    finally:
        if errf:
            errf.close()
    wall = time.perf_counter() - t0
    if log is not None:
        err = Path(log).read_text(errors="replace")
    res = None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
    return Spawned(res, wall, proc.returncode, err or "", killed)


def killed_by_signal(returncode: int) -> bool:
    """Whether a worker died of SIGKILL, SIGABRT or SIGSEGV (the usual out-of-memory deaths)."""
    return returncode in (-signal.SIGKILL, -signal.SIGABRT, -signal.SIGSEGV)


def ok(res: dict | None) -> bool:
    return bool(res) and res.get("status") == "ok"


def print_table(rows: list[tuple], header: tuple, *, right_align: bool = True, rule: bool = False) -> None:
    """Columns padded to their widest cell; the first left-aligned, the others right-aligned
    (``right_align``) or left-aligned; with ``rule`` a line of dashes under the header."""
    rows = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for n, r in enumerate(rows):
        print("  ".join(c.rjust(w) if i and right_align else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if rule and n == 0:
            print("  ".join("-" * w for w in widths))


def pin_ort_threads(threads: int) -> None:
    """ORT's calibrators build their session in CalibraterBase.create_inference_session with
    default SessionOptions (all cores); rebuild it the same way (ORT_DISABLE_ALL, the providers
    it chose) but with ``threads`` intra-op threads. quantize_static goes through the same method.
    Imports onnxruntime when called (workers only)."""
    import onnxruntime
    from onnxruntime.quantization.calibrate import CalibraterBase

    def create_inference_session(self):
        so = onnxruntime.SessionOptions()
        so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=so,
                                                          providers=self.execution_providers)

    CalibraterBase.create_inference_session = create_inference_session
