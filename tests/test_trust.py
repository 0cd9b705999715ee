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


# ---------------------------------------------------------------- §3: refuse in a second


def test_config_that_does_not_match_the_tensors_is_refused_before_building(model, sample_text_file, capsys):
    config = json.loads((model / "config.json").read_text())
    for key, value, words in (("num_hidden_layers", 10**7, "num_hidden_layers is 10000000 but the checkpoint"),
                              ("num_hidden_layers", "2", "must be a positive integer"),
                              ("vocab_size", 10**6, "vocab_size is 1000000 but the token embedding")):
        (model / "config.json").write_text(json.dumps({**config, key: value}))
        assert main(["eval", str(model), "--text", str(sample_text_file), "--ctx", "16"]) == 2
        assert words in capsys.readouterr().err


def test_pack_with_an_absurd_config_is_refused(tiny_lq_pack, tmp_path, sample_text_file, capsys):
    pack = Path(shutil.copytree(tiny_lq_pack, tmp_path / "pack"))
    config = json.loads((pack / "config.json").read_text())
    (pack / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**7}))
    assert main(["eval", str(pack), "--text", str(sample_text_file), "--ctx", "16"]) == 2
    assert "num_hidden_layers is 10000000" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["quantize", "{m}", "--method", "liftquant", "--rate", "25/10", "--seq-len", "16", "-o", "{o}"], "no codebook is shipped for this rate; nearest shipped"),
    (["quantize", "{m}", "--method", "liftquant", "--rate", "24/10", "--seq-len", "100000", "-o", "{o}"], "beyond the 256 positions"),
    (["plan", "{m}", "--bits", "0.5"], "--bits is the average stored bits per weight"),
    (["plan", "{m}", "--lambda", "2"], "--lambda must be between 0"),
    (["plan", "{m}", "--target", "android", "--ram", "4GB", "--context", "100000"], "beyond the 256 positions"),
    (["plan", "{m}", "--bits", "3", "--menu", "24/10", "7/3"], "--menu 7/3: no codebook"),
    (["build", "{m}", "--target", "android", "--ram", "4GB", "--samples", "0", "-o", "{o}"], "--samples must be"),
    (["plan", "{m}", "--bits", "3", "--device", "mps"], "liftedge measures and quantizes on cpu or cuda"),
    (["plan", "{m}", "--bits", "3", "--device", "gpu0"], "is not a torch device"),
    pytest.param(["build", "{m}", "--target", "android", "--ram", "4GB", "--device", "cuda", "-o", "{o}"],
                 "torch sees no CUDA device", marks=pytest.mark.skipif(
                     __import__("torch").cuda.is_available(), reason="this machine has CUDA: the device is fine")),
])
def test_arguments_are_checked_before_the_model_loads(model, tmp_path, argv, words, capsys, monkeypatch):
    import liftedge.model

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(liftedge.model, "load_model", no_loading)
    args = [a.format(m=model, o=tmp_path / "out") for a in argv]
    assert main(args) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- §4: one-line errors


def _gguf(path: Path, entries: list[bytes], n_tensors: int = 0) -> Path:
    """A GGUF header by hand: magic, version 3, tensor count, then the given key/value entries."""
    import struct

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(entries)) + b"".join(entries) + b"\0" * 64)
    return path


def _key(name: str) -> bytes:
    import struct

    return struct.pack("<Q", len(name)) + name.encode()


def _string_kv(name: str, value: str) -> bytes:
    import struct

    return _key(name) + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value.encode()


def _u32_kv(name: str, value: int) -> bytes:
    import struct

    return _key(name) + struct.pack("<II", 4, value)


@pytest.mark.parametrize("entries", [
    [_string_kv("general.architecture", "llama"), _u32_kv("general.alignment", 0)],
    [_string_kv("general.architecture", "llama"), _string_kv("general.alignment", "32")],
    # an array of 2**60 strings: a loop over the count would never end
    [_string_kv("general.architecture", "llama"),
     _key("tokenizer.ggml.tokens") + (9).to_bytes(4, "little") + (8).to_bytes(4, "little") + (1 << 60).to_bytes(8, "little")],
], ids=["alignment-0", "alignment-string", "huge-array"])
def test_corrupt_gguf_headers_are_one_line_errors(entries, tmp_path, sample_text_file, capsys):
    path = _gguf(tmp_path / "bad.gguf", entries)
    assert main(["eval", str(path), "--text", str(sample_text_file)]) == 2
    assert "corrupt GGUF header" in capsys.readouterr().err


def test_tokenizer_larger_than_the_embedding_is_refused(model, tmp_path, capsys, sample_text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens([f"<extra_{i}>" for i in range(8)])
    tok.save_pretrained(model)
    assert main(["eval", str(model), "--text", str(sample_text_file), "--ctx", "16"]) == 2
    assert "the tokenizer has 328 tokens but the model's embedding only 320 rows" in capsys.readouterr().err


def test_shard_index_naming_files_outside_the_folder_is_refused(model, tmp_path, sample_text_file, capsys):
    (model / "model.safetensors").rename(model / "shard-1.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "../other/model.safetensors", "x": "shard-1.safetensors"}}))
    assert main(["eval", str(model), "--text", str(sample_text_file), "--ctx", "16"]) == 2
    assert "names shard files outside" in capsys.readouterr().err


def test_text_of_nul_bytes_only_is_too_little_text(model, tmp_path, capsys):
    text = tmp_path / "nul.txt"
    text.write_bytes(b"\0" * 4096)
    assert main(["eval", str(model), "--text", str(text), "--ctx", "16"]) == 2
    assert "holds no text" in capsys.readouterr().err


@pytest.fixture
def pack(tiny_lq_pack, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_lq_pack, tmp_path / "pack"))


def _edit_manifest(pack: Path, edit) -> None:
    manifest = json.loads((pack / "manifest.json").read_text())
    edit(manifest)
    (pack / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["sites"][next(iter(m["sites"]))].pop("kind"), "lacks a valid 'kind'"),
    (lambda m: m["sites"].update({next(iter(m["sites"])): [1, 2]}), "is a list, not an object"),
    (lambda m: m["totals"].update(nbytes="many"), "totals.nbytes is 'many'"),
], ids=["missing-kind", "list-site", "string-total"])
def test_inspect_of_a_malformed_manifest_is_one_line(pack, edit, words, capsys):
    _edit_manifest(pack, edit)
    assert main(["inspect", str(pack)]) == 2
    err = capsys.readouterr().err
    assert words in err and "corrupt" in err and "Traceback" not in err


def test_corrupt_manifest_says_corrupt_pack(pack, sample_text_file, capsys):
    (pack / "manifest.json").write_text("{not json")
    assert main(["eval", str(pack), "--text", str(sample_text_file), "--ctx", "16"]) == 2
    err = capsys.readouterr().err
    assert "the pack is corrupt" in err and "model.safetensors" not in err


def test_nan_in_a_pack_and_swapped_weights_are_refused(pack, tiny_lq_pack, tmp_path, sample_text_file, capsys):
    from safetensors.torch import load_file, save_file

    from liftedge.packed import WEIGHTS_NAME

    tensors = load_file(str(pack / WEIGHTS_NAME))
    # same shapes, different bytes: the manifest's SHA-256 no longer matches
    name = next(k for k, v in tensors.items() if k.endswith("scale") and v.is_floating_point())
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(pack / WEIGHTS_NAME))
    assert main(["eval", str(pack), "--text", str(sample_text_file), "--ctx", "16"]) == 2
    assert "SHA-256 differs" in capsys.readouterr().err
    # NaN: refused even when the hash is updated to match (a pack written with NaN in it)
    tensors[name][0] = float("nan")
    save_file(tensors, str(pack / WEIGHTS_NAME))
    from liftedge.cache import sha256_file

    _edit_manifest(pack, lambda m: m.update(weights_sha256=sha256_file(pack / WEIGHTS_NAME)))
    assert main(["eval", str(pack), "--text", str(sample_text_file), "--ctx", "16"]) == 2
    assert "non-finite values" in capsys.readouterr().err


def test_pack_site_shapes_must_match_the_model(pack, sample_text_file, capsys):
    def shrink(m):
        site = next(iter(s for s in m["sites"].values() if s["kind"] == "linear"))
        site["meta"]["out_features"] = site["meta"]["out_features"] // 2
    _edit_manifest(pack, shrink)
    assert main(["eval", str(pack), "--text", str(sample_text_file), "--ctx", "16"]) == 2
    err = capsys.readouterr().err
    # caught where the stored tensors are checked against the site's declared shape: one line
    assert err.startswith("liftedge: error:") and err.count("\n") == 1 and "expected" in err


def test_kl_reference_must_be_the_packs_source(pack, tmp_path, sample_text_file, capsys, tiny_llama_dir):
    _edit_manifest(pack, lambda m: m["source"].update(path=str(tmp_path / "gone")))
    assert main(["eval", str(pack), "--text", str(sample_text_file), "--ctx", "16"]) == 2
    assert "is not there any more; pass --reference" in capsys.readouterr().err
    other = Path(shutil.copytree(tiny_llama_dir, tmp_path / "other"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))  # another model
    _edit_manifest(pack, lambda m: m["source"].update(path=str(other)))
    assert main(["eval", str(pack), "--text", str(sample_text_file), "--ctx", "16"]) == 2
    assert "is not the model this pack was quantized from" in capsys.readouterr().err


def test_profile_of_a_garbage_pte_is_an_error_not_an_abort(tmp_path):
    bad = tmp_path / "model.pte"
    bad.write_bytes(os.urandom(4096))
    done = subprocess.run([sys.executable, "-c", "import sys; from liftedge.cli import main; "
                           f"sys.exit(main(['profile', {str(bad)!r}, '-o', {str(tmp_path / 'p')!r}]))"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-500:]
    assert "is not an ExecuTorch program" in done.stderr
