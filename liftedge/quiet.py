"""Quiet by default: third-party noise off the user's screen, all of it back with --verbose.

Owns what liftedge's commands print that liftedge did not write: Python warnings and log
records of the libraries it drives (torch, torchao, transformers, ExecuTorch, coremltools,
onnxscript), the Hugging Face progress bars, and the lines ExecuTorch's native runtime writes
straight to file descriptor 2 (its cpuinfo probing). liftedge's own lines, progress bars and
errors are never filtered; a native line that is not known noise always passes.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import warnings

# Loggers of the libraries liftedge drives; their records below ERROR are noise to a user.
THIRD_PARTY_LOGGERS = ("torch", "torchao", "transformers", "executorch", "coremltools", "onnxscript",
                       "onnx_ir", "onnxruntime", "huggingface_hub", "accelerate", "urllib3", "filelock")

# Lines native code writes to fd 2 that say nothing to a user: ExecuTorch's CPU probing in a VM,
# and the INFO lines of ExecuTorch's C++ tokenizer while TextLLMRunner loads tokenizer.json.
NATIVE_NOISE_PREFIXES = (b"[cpuinfo_utils.cpp:", b"I tokenizers:")


def quiet_python(verbose: bool) -> None:
    """Silence third-party warnings, log records and progress bars unless `verbose`.

    Environment variables are set (not overwritten) before the libraries are imported, since
    some read them once at import."""
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def filter_native_stderr() -> None:
    """Route fd 2 through a thread that drops known native noise lines, forwarding the rest
    as it comes (partial lines such as progress bars included). For the console script only:
    it replaces the process's stderr descriptor, which in-process callers (tests) own."""
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    thread = threading.Thread(target=_forward, args=(read_end, real), daemon=True)
    thread.start()

    def _drain() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last writer: the thread sees EOF and finishes
        thread.join(timeout=5)

    atexit.register(_drain)


def _forward(read_end: int, real: int) -> None:
    pending = b""
    while chunk := os.read(read_end, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.startswith(NATIVE_NOISE_PREFIXES):
                os.write(real, line + b"\n")
        if pending and not any(p.startswith(pending[: len(p)]) for p in NATIVE_NOISE_PREFIXES):
            os.write(real, pending)  # a partial line that cannot be noise: show it now
            pending = b""
    if pending and not pending.startswith(NATIVE_NOISE_PREFIXES):
        os.write(real, pending)
