"""`liftedge profile ARTIFACT`: latency of a built artifact on this machine, or of a recorded profile.

Argument handling, file writing and printing only; the work is `liftedge.profile.run`. The
JSON report is written atomically to OUT/profile.json (OUT: -o, else the artifact's folder),
with --html also OUT/profile.html; a live run keeps its ETDump / ORT profile in OUT too, so it
can be analysed again with --etdump / --ort-profile.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="load time, prefill/decode tokens/s, peak RSS and per-operator time of a .pte/.onnx/.ort",
        description="Run ARTIFACT (a `liftedge build` folder or a .pte / .onnx / .ort file) on this machine's runtime "
                    "(ExecuTorch with ETDump, ONNX Runtime with its profiler) and report load time, prefill and "
                    "decode tokens/s over repeats, peak RSS, a per-operator table, and the decode bound "
                    "(bytes read per token over memory bandwidth) of --device and of this machine. With --etdump "
                    "or --ort-profile, analyse a profile recorded elsewhere (e.g. on a phone) instead of running.")
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact folder, or a .pte / .onnx / .ort file")
    p.add_argument("--device", default=None, metavar="NAME",
                   help="device profile whose memory bandwidth gives the phone's bound (see `liftedge devices`)")
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=32,
                   help="prompt length of the prefill call (default 32; with a recorded profile: its prompt length)")
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=16,
                   help="decoded tokens per repeat (default 16; with a recorded profile: tokens per generation)")
    p.add_argument("--repeats", type=int, default=3, help="prefill + decode repeats (default 3)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: ORT's)")
    r = p.add_argument_group("recorded profiles (no run)")
    r.add_argument("--etdump", type=Path, default=None, metavar="FILE", help="an ETDump written by ExecuTorch")
    r.add_argument("--etrecord", type=Path, default=None, metavar="FILE",
                   help="the ETRecord of the program (layer names); default: ARTIFACT's .etrecord if present")
    r.add_argument("--ort-profile", dest="ort_profile", type=Path, default=None, metavar="FILE",
                   help="an ONNX Runtime JSON profile (SessionOptions.enable_profiling)")
    s = p.add_argument_group("model shape for the bound, where no report.json says it")
    s.add_argument("--pack", type=Path, default=None, help="the pack (or config.json) the artifact was built from")
    s.add_argument("--max-context", dest="max_context", type=int, default=None, help="a .pte's static KV length")
    p.add_argument("--no-host-bound", dest="host_bound", action="store_false",
                   help="skip this machine's bandwidth (measured once per machine, then cached)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--html", action="store_true", help="also write profile.html (self-contained, inline SVG)")
    p.add_argument("-o", "--output", type=Path, default=None, help="folder for profile.json/.html (default: beside ARTIFACT)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from liftedge.io import atomic_write_bytes, atomic_write_json
    from liftedge.profile.artifact import resolve
    from liftedge.profile.html import render_html
    from liftedge.profile.report import format_text
    from liftedge.profile.run import ProfileRequest
    from liftedge.progress import progress

    req = ProfileRequest(artifact=args.artifact, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                         repeats=args.repeats, device=args.device, etdump=args.etdump, etrecord=args.etrecord,
                         ort_profile=args.ort_profile, pack=args.pack, max_context=args.max_context,
                         threads=args.threads, host_bound=args.host_bound)
    out = args.output or resolve(args.artifact).folder
    report = _profile_in_scratch(req, out, progress)
    atomic_write_json(out / "profile.json", report)
    written = [out / "profile.json"]
    if args.html:
        atomic_write_bytes(out / "profile.html", render_html(report).encode("utf-8"))
        written.append(out / "profile.html")
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_text(report))
        print("wrote " + ", ".join(str(w) for w in written))
    return 0


def _profile_in_scratch(req, out: Path, progress) -> dict:
    """Run the profile in a scratch folder inside `out`; its raw files (ETDump, ORT profile) move
    into `out` only when the run succeeded, so a failed run leaves nothing behind."""
    import os
    import shutil
    import tempfile

    from liftedge.errors import ArtifactError
    from liftedge.profile.run import profile_artifact

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".profile-", dir=out))
    except OSError as exc:
        raise ArtifactError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        report = profile_artifact(req, scratch, progress=progress)
        for item in scratch.iterdir():
            os.replace(item, out / item.name)
        # the report names its raw files where they now live, not in the scratch folder
        report["files"] = {k: str(out / Path(v).name) if Path(v).parent == scratch else v
                           for k, v in report.get("files", {}).items()}
        return report
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
