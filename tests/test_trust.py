"""Outputs never destroy what the user did not ask to replace (issue 17 §2).

Each test gives liftedge a destination holding something of the user's, or one of the command's
own inputs, and checks the one-line refusal and that the user's bytes are still there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from liftedge import cli
from liftedge.cli import main
from liftedge.errors import ArtifactError
from liftedge.io import OUTPUT_MARKER, atomic_output_dir, claim_output

RTN = ["--method", "rtn", "--bits", "4", "--samples", "2", "--seq-len", "16"]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tiny_llama_dir, tmp_path) -> Path:
    """A private copy of the tiny Llama: tests may point outputs at it."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


@pytest.fixture
def calib(sample_text_file) -> list[str]:
    return ["--calib", str(sample_text_file)]


def _quantize(model: Path, out: Path, calib, *extra) -> int:
    return main(["quantize", str(model), *RTN, *calib, "-o", str(out), *extra])


def test_force_never_replaces_an_input(model, calib, capsys):
    before = _tree(model)
    for out in (model, model.parent, model / "inner"):
        assert _quantize(model, out, calib, "--force") == 2
        assert "would overwrite an input of this command" in capsys.readouterr().err
    assert _tree(model) == before


def test_force_replaces_only_liftedge_outputs(model, calib, tmp_path, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.py").write_text("print('mine')\n")
    assert _quantize(model, mine, calib, "--force") == 2
    assert "not a folder liftedge wrote" in capsys.readouterr().err
    assert (mine / "notes.py").read_text() == "print('mine')\n"
    # a file is not replaced either
    (tmp_path / "file").write_text("keep")
    assert _quantize(model, tmp_path / "file", calib, "--force") == 2
    assert (tmp_path / "file").read_text() == "keep"
    # liftedge's own output (it carries the marker) is replaced with --force, refused without
    out = tmp_path / "pack"
    assert _quantize(model, out, calib) == 0
    assert json.loads((out / OUTPUT_MARKER).read_text())["written_by"] == "liftedge"
    assert _quantize(model, out, calib) == 2
    assert "pass --force" in capsys.readouterr().err
    assert _quantize(model, out, calib, "--force") == 0


def test_a_locked_destination_is_refused(model, calib, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path / ".out.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _quantize(model, out, calib) == 2
        assert "another liftedge run is writing" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_something_written_there_during_the_run_is_kept(model, calib, tmp_path, capsys, monkeypatch):
    import liftedge.packed as packed

    out = tmp_path / "out"
    write = packed._write_weights

    def user_writes_meanwhile(*args, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("theirs")
        return write(*args, **kwargs)

    monkeypatch.setattr(packed, "_write_weights", user_writes_meanwhile)
    assert _quantize(model, out, calib) == 2
    err = capsys.readouterr().err
    assert "changed while this run was writing it" in err and "nothing was replaced" in err
    assert _tree(out) == {"theirs.txt": b"theirs"}
    (kept,) = tmp_path.glob("out.liftedge-new-*")
    assert (kept / OUTPUT_MARKER).is_file()


def test_plan_output_file_rules(model, calib, tmp_path, capsys):
    plan = ["plan", str(model), "--bits", "3", *calib, "--samples", "2", "--seq-len", "16"]
    existing = tmp_path / "plan.json"
    existing.write_text("user's file")
    assert main([*plan, "-o", str(existing)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main([*plan, "-o", str(existing), "--force"]) == 2
    assert "not a plan liftedge wrote" in capsys.readouterr().err
    assert existing.read_text() == "user's file"
    (tmp_path / "folder").mkdir()
    assert main([*plan, "-o", str(tmp_path / "folder")]) == 2
    assert "is a folder" in capsys.readouterr().err
    # a plan liftedge wrote may be replaced with --force (checked without running the plan)
    from argparse import Namespace

    from liftedge.commands.plan import check_plan_output

    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"plan": {}, "memory": None, "request": {}}))
    check_plan_output(Namespace(output=ours, force=True, model=str(model), calib=None))
    with pytest.raises(ArtifactError, match="pass --force"):
        check_plan_output(Namespace(output=ours, force=False, model=str(model), calib=None))


def test_sigterm_inside_a_build_leaves_nothing_beside_the_destination(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "dest" / "out"
    try:
        cli._terminate_as_exception()
        with pytest.raises(cli.Terminated):
            with atomic_output_dir(out) as tmp:
                (tmp / "half.bin").write_bytes(b"x" * 1000)
                os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no .out.tmp-*, no .out.lock, no out


def test_unwritable_destinations_are_one_line_errors(model, calib, tmp_path, capsys):
    assert _quantize(model, Path("/dev/null"), calib) == 2
    assert "already exists" in capsys.readouterr().err
    # /proc refuses new entries even to root (a chmod'ed folder would not stop root)
    assert _quantize(model, Path("/proc/liftedge-out"), calib) == 2
    assert "cannot write /proc/liftedge-out" in capsys.readouterr().err


def test_claim_is_exclusive_within_a_run(tmp_path):
    out = tmp_path / "o"
    with claim_output(out):
        assert (tmp_path / ".o.lock").is_file()
    assert not (tmp_path / ".o.lock").exists()
    (out).mkdir()
    (out / "x").write_text("x")
    with pytest.raises(ArtifactError, match="already exists"):
        with claim_output(out):
            pass
