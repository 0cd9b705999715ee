"""`liftedge profile`: live ExecuTorch (ETDump) and ONNX Runtime (profiler) runs of tiny artifacts,
the report's numbers and tables, replaying recorded profiles, the HTML file, and bad input.

Real runtimes on the tiny Llama of `conftest.py`; no timing is asserted, only relations that
hold at any speed (operator time within the wall time of the calls that contain it, medians
inside their spread, replay equal to the live table).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("executorch")
pytest.importorskip("onnxruntime")

from liftedge.cli import main  # noqa: E402
from liftedge.errors import ArtifactError, LiftedgeError  # noqa: E402
from liftedge.profile.bound import decode_read_nbytes, onnx_weight_nbytes  # noqa: E402
from liftedge.profile.html import render_html  # noqa: E402
from liftedge.profile.run import ProfileRequest, profile_artifact  # noqa: E402

PROMPT, NEW, REPEATS, MAX_CONTEXT = 8, 6, 3, 64
# Operators run inside the runtime call that the wall clock times, so their sum cannot exceed it;
# 1.05 allows for the two clocks' granularity (µs timer vs ns events) on sub-millisecond tokens.
COVERAGE_MAX = 1.05
# On a tiny model a decoded token costs ~0.5 ms (ExecuTorch) or ~10 ms (ORT, profiler on): the
# Python call, input conversion and (ORT) per-node profiler fences are a fixed cost of the same
# order, so coverage is lower than on a real model (SmolLM2: see benchmarks/results/profile_*).
# Measured here (2 loaded cores): ExecuTorch 0.89-0.95, ORT 0.45-0.6. The floors sit below that
# with room for load, and still catch a table that lost a whole operator class: without the
# XNNPACK rows ET would fall to ~0.45, without the lift-project nodes (~70% of ORT's operator
# time) ORT to ~0.15.
COVERAGE_MIN = {"executorch": 0.5, "onnxruntime": 0.2}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module: the ET kernel library builds once, the bandwidth is measured once."""
    return tmp_path_factory.mktemp("profile-cache")


@pytest.fixture(autouse=True)
def _shared_cache(shared_cache, monkeypatch):
    monkeypatch.setenv("LIFTEDGE_CACHE", str(shared_cache))


@pytest.fixture(scope="module")
def pack(tiny_lq_pack):
    """The session's tiny LQ-24/10 Llama pack (conftest), shared with the other target tests."""
    return tiny_lq_pack


@pytest.fixture(scope="module")
def et_dir(pack, tmp_path_factory, shared_cache):
    """model.pte (custom op + XNNPACK) with its ETRecord beside it."""
    import threading

    from liftedge.profile.executorch import lower_with_etrecord
    from liftedge.targets.executorch import export, kernel

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIFTEDGE_CACHE", str(shared_cache))
        build = threading.Thread(target=kernel.library_path, daemon=True)  # g++ compiles while the model exports
        build.start()
        out = tmp_path_factory.mktemp("profile-et")
        opts = export.ExportOptions(custom_ops=True, max_context=MAX_CONTEXT, max_prefill=16)
        _, model, _ = export.prepare_model(pack, opts)
        lower_with_etrecord(export.export_program(model, opts), out / "model.pte", out / "model.etrecord")
        build.join()
    return out


@pytest.fixture(scope="module")
def ort_dir(pack, tmp_path_factory):
    from liftedge.lowering import build_artifact

    out = tmp_path_factory.mktemp("profile-ort") / "art"
    build_artifact(pack, "onnxruntime", out, options={"ort": "no", "new_tokens": 4})
    return out


def _cli(args: list) -> dict:
    assert main(["profile", *map(str, args)]) == 0
    out = Path(args[args.index("-o") + 1])
    return json.loads((out / "profile.json").read_text())


ARGS = ["--prompt-tokens", PROMPT, "--new-tokens", NEW]


@pytest.fixture(scope="module")
def et_live(et_dir, pack, tmp_path_factory, shared_cache):
    out = tmp_path_factory.mktemp("et-live")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIFTEDGE_CACHE", str(shared_cache))
        return _cli([et_dir, *ARGS, "--repeats", REPEATS, "--pack", pack, "--max-context", MAX_CONTEXT,
                     "--device", "pixel-8a", "--html", "-o", out]), out


@pytest.fixture(scope="module")
def ort_live(ort_dir, tmp_path_factory, shared_cache):
    out = tmp_path_factory.mktemp("ort-live")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIFTEDGE_CACHE", str(shared_cache))
        return _cli([ort_dir, *ARGS, "--repeats", REPEATS, "--device", "iphone-15", "--html", "-o", out]), out


def _check_report(report: dict, runtime: str) -> None:
    assert report["runtime"] == runtime and report["source"] == "live run"
    assert report["executions"] == REPEATS * (1 + NEW) and report["decoded_tokens"] == REPEATS * NEW
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        s = report[key]
        assert len(s["values"]) == REPEATS and s["min"] <= s["median"] <= s["max"] and s["min"] > 0
    assert report["load_ms"] > 0
    assert report["peak_rss_nbytes"] >= report["baseline_rss_nbytes"] > 0
    assert COVERAGE_MIN[runtime] < report["op_time_coverage"] <= COVERAGE_MAX
    # the table's own arithmetic: shares sum to 1, rows sum to the operator total per token
    assert abs(sum(r["share"] for r in report["ops"]) - 1) < 1e-9
    assert abs(sum(r["ms_per_token"] for r in report["ops"]) - report["decode_op_ms_per_token"]) < 1e-9
    assert {"layers.0", "layers.1"} <= {s["layer"] for s in report["layers"]}
    labels = [b["label"] for b in report["bounds"]]
    assert len(labels) == 2 and labels[1].startswith("this machine")
    device, host = report["bounds"]
    assert device["read_nbytes_per_token"] == host["read_nbytes_per_token"] > 0
    # bound = bandwidth / bytes, exactly as stated
    assert device["tokens_per_s"] == pytest.approx(device["bandwidth_gbps"] * 1e9 / device["read_nbytes_per_token"])
    assert host["measured_tokens_per_s"] == report["decode_tokens_per_s"]["median"]


def test_onnxruntime_live_report_and_replay(ort_live, ort_dir, tmp_path):
    report, _ = ort_live
    _check_report(report, "onnxruntime")
    assert {"lift-project (stock ops)", "ORT CPU"} <= {r["kind"] for r in report["ops"]}
    profile = Path(report["files"]["ort_profile"])
    replay = _cli([ort_dir, *ARGS, "--ort-profile", profile, "--no-host-bound", "-o", tmp_path])
    assert replay["ops"] == report["ops"]


def test_bad_ort_profile_is_a_clear_error(ort_dir, tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"not": "a trace"}')
    with pytest.raises(ArtifactError, match="not an ONNX Runtime JSON profile"):
        profile_artifact(ProfileRequest(str(ort_dir), ort_profile=bad, host_bound=False), tmp_path)
    with pytest.raises(LiftedgeError, match="ExecuTorch"):
        profile_artifact(ProfileRequest(str(ort_dir), etdump=bad, host_bound=False), tmp_path)


def test_executorch_live_report(et_live):
    report, out = et_live
    _check_report(report, "executorch")
    kinds = {r["kind"] for r in report["ops"]}
    assert {"lift-project kernel", "XNNPACK", "portable"} <= kinds
    lq = [r for r in report["ops"] if r["kind"] == "lift-project kernel"]
    # 7 linear sites per block attributed to their block by the ETRecord, in 4 calls per token:
    # q/k/v in one after the folded norm, o and down with the residual add after them, gate+up
    # in one (export's fusion.py)
    calls = {(r["layer"], r["name"]): r["calls_per_token"] for r in lq}
    assert calls == {(f"layers.{i}", f"liftedge::{op}.out"): n for i in (0, 1)
                     for op, n in (("lq_rms_linear3", 1), ("lq_linear_add", 2), ("lq_glu", 1))}
    assert (out / "profile.etdp").is_file() and (out / "profile.html").is_file()


def test_etdump_replay_gives_the_live_table(et_live, et_dir, pack, tmp_path):
    live, out = et_live
    replay = _cli([et_dir / "model.pte", *ARGS, "--etdump", out / "profile.etdp", "--etrecord",
                   et_dir / "model.etrecord", "--pack", pack, "--max-context", MAX_CONTEXT, "--device", "pixel-8a",
                   "-o", tmp_path])
    assert replay["source"].startswith("ETDump")
    assert replay["ops"] == live["ops"] and replay["layers"] == live["layers"]
    assert replay["executions"] == live["executions"]
    # a recorded profile's speed is compared with the recording device's bound, not this machine's
    device, host = replay["bounds"]
    assert device["measured_tokens_per_s"] == replay["decode_tokens_per_s"]["median"]
    assert host["measured_tokens_per_s"] is None


def test_corrupt_etdump_and_missing_etrecord_are_clear_errors(et_live, et_dir, tmp_path, capsys):
    _, out = et_live
    data = (out / "profile.etdp").read_bytes()
    cut = tmp_path / "cut.etdp"
    cut.write_bytes(data[: len(data) // 3])
    junk = tmp_path / "junk.etdp"
    junk.write_bytes(b"not an etdump at all")
    for bad in (cut, junk):
        with pytest.raises(ArtifactError, match="not an ETDump"):
            profile_artifact(ProfileRequest(str(et_dir), etdump=bad, host_bound=False), tmp_path)
    flipped = bytearray(data)  # a whole header, garbage inside: the flatbuffer reader fails
    rng = np.random.default_rng(0)
    for i in rng.integers(64, len(data), 200):
        flipped[i] = int(rng.integers(0, 256))
    garbled = tmp_path / "garbled.etdp"
    garbled.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="ETDump is corrupt"):
        profile_artifact(ProfileRequest(str(et_dir), etdump=garbled, host_bound=False), tmp_path)
    with pytest.raises(ArtifactError, match="ETRecord .*missing.etrecord not found"):
        profile_artifact(ProfileRequest(str(et_dir), etdump=out / "profile.etdp", etrecord=tmp_path / "missing.etrecord",
                                        host_bound=False), tmp_path)
    # the CLI turns it into one line and exit status 2
    assert main(["profile", str(et_dir), "--etdump", str(junk), "-o", str(tmp_path)]) == 2
    assert "not an ETDump" in capsys.readouterr().err


def test_html_is_one_self_contained_file(et_live):
    report, out = et_live
    text = (out / "profile.html").read_text()
    assert render_html(report).count("<svg") == text.count("<svg")  # the JSON round trip draws the same
    assert text.count("<svg") >= 3  # operators, bound vs measured, layers
    assert "<script" not in text and "<link" not in text and "src=" not in text
    urls = {u.split('"')[0] for u in text.split("http")[1:]}
    assert urls <= {"://www.w3.org/2000/svg"}  # the SVG namespace is the only URL, and it is never fetched
    assert "liftedge::lq_linear_add.out" in text and "this machine" in text


def test_bytes_per_token_arithmetic(ort_dir):
    import onnx
    from onnx import numpy_helper

    # weights + one gathered row instead of the table + the table again when the head is tied + KV
    assert decode_read_nbytes(1000, gathered_table_nbytes=400, gathered_row_nbytes=4, kv_cache_nbytes=10) == 614
    assert decode_read_nbytes(1000, gathered_table_nbytes=400, gathered_row_nbytes=4, head_reads_table=True) == 1004
    # the tiny model's tables (vocab 320) are below the gather-only cut, so every initializer counts
    model = onnx.load(str(ort_dir / "model.onnx"))
    assert onnx_weight_nbytes(ort_dir / "model.onnx") == sum(numpy_helper.to_array(t).nbytes
                                                             for t in model.graph.initializer)


def test_bad_artifacts_and_arguments_are_refused(tmp_path):
    pkg = tmp_path / "model.mlpackage"
    pkg.mkdir()
    with pytest.raises(ArtifactError, match="Apple hardware"):
        profile_artifact(ProfileRequest(str(pkg)), tmp_path)
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(ArtifactError, match="cannot tell the runtime"):
        profile_artifact(ProfileRequest(str(other)), tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        profile_artifact(ProfileRequest(str(tmp_path / "absent.pte")), tmp_path)
    with pytest.raises(LiftedgeError, match="--new-tokens must be >= 1"):
        ProfileRequest("x.pte", new_tokens=0)


def test_host_bandwidth_is_measured_once(shared_cache):
    from liftedge.profile.host import host_bandwidth_gbs, peak_rss_nbytes

    first, second = host_bandwidth_gbs("read"), host_bandwidth_gbs("read")
    assert second["cached"] and second["gbps"] == first["gbps"] > 0
    assert peak_rss_nbytes() > 0


def _console(args: list, env_cache) -> str:
    """stderr of the installed `liftedge` console script (the way a user runs it)."""
    import os
    import subprocess
    import sys

    script = Path(sys.executable).with_name("liftedge")
    env = {**os.environ, "LIFTEDGE_CACHE": str(env_cache), "LIFTEDGE_NO_PROGRESS": "1"}
    done = subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stderr


# Lines the libraries liftedge drives print on their own (issue 17 §5): the ExecuTorch runtime's
# native CPU probing, torch's `W...` log lines, Python warnings, torchao's load failures.
NOISE = ("[cpuinfo_utils.cpp:", "_pytree.py", "Warning:", "UserWarning", "FutureWarning", "Failed to load",
         "libcustom_ops_aot_lib")  # the last: ExecuTorch LLM ops announcing their library (root logger, INFO)


def test_console_is_quiet_by_default_and_verbose_shows_the_libraries(et_dir, shared_cache, tmp_path):
    args = ["profile", et_dir, *ARGS, "--repeats", 1, "--max-context", MAX_CONTEXT, "--device", "pixel-8a"]
    quiet = _console([*args, "-o", tmp_path / "quiet"], shared_cache)
    assert [line for line in quiet.splitlines() if any(n in line for n in NOISE)] == []
    verbose = _console(["--verbose", *args, "-o", tmp_path / "verbose"], shared_cache)
    # In this VM ExecuTorch always reports its CPU probing; --verbose must let it through.
    assert "[cpuinfo_utils.cpp:" in verbose


def test_native_noise_filter_drops_known_lines_only():
    """The fd-2 filter of the console script drops ExecuTorch's CPU probing and its C++
    tokenizer's INFO lines (printed while TextLLMRunner checks a build) and passes the rest."""
    import os
    import threading

    from liftedge import quiet

    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    t = threading.Thread(target=quiet._forward, args=(src_r, dst_w))
    t.start()
    os.write(src_w, b"I tokenizers:regex.cpp:40] Registering override fallback regex\nwrote out\n"
                    b"[cpuinfo_utils.cpp:91] probing\nE real error\n")
    os.close(src_w)
    t.join(timeout=10)
    os.close(dst_w)
    assert os.read(dst_r, 4096) == b"wrote out\nE real error\n"
