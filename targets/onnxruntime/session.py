"""Opening an ONNX Runtime session on an artifact, and the KV-carrying step function.

`open_session` loads `.onnx` or `.ort` with every graph optimisation on and turns a load
failure (missing, truncated, malformed file) into an `ArtifactError` naming the path.
`make_step` wraps a session in the `liftedge.verify` step contract: it feeds
`past_key_values.*` from the previous call's `present.*`, so prefill is one call and each
decoded token one more. This module owns the runtime side only; what the graph contains
belongs to `graph`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from liftedge.errors import ArtifactError


def open_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found; the artifact is incomplete")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise ArtifactError(f"{path} cannot be loaded by ONNX Runtime ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300]}); the file is malformed or truncated") from None


def _past_spec(session) -> list[tuple[str, int, int]]:
    """(input name, kv heads, head dim) of every past_key_values input."""
    return [(i.name, i.shape[1], i.shape[3]) for i in session.get_inputs() if i.name.startswith("past_key_values.")]


def make_step(session):
    """A `liftedge.verify` step function over `session` (batch 1, its own growing KV cache)."""
    past = {name: np.zeros((1, heads, 0, dim), np.float32) for name, heads, dim in _past_spec(session)}
    present_names = [n.replace("past_key_values.", "present.") for n in past]
    state = {"length": 0}

    def step(ids: list[int], start_pos: int) -> np.ndarray:
        if start_pos != state["length"]:
            raise ArtifactError(f"the ORT cache holds {state['length']} tokens, step starts at {start_pos}")
        n = len(ids)
        feeds = {"input_ids": np.asarray([ids], np.int64),
                 "attention_mask": np.ones((1, start_pos + n), np.int64),
                 "position_ids": np.arange(start_pos, start_pos + n, dtype=np.int64)[None], **past}
        outputs = session.run(["logits", *present_names], feeds)
        for name, value in zip(past, outputs[1:]):
            past[name] = value
        state["length"] = start_pos + n
        return outputs[0][0]

    return step
