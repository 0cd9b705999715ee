"""`liftedge profile`: latency of a built artifact on this machine's runtime, and its memory bound.

Modules, one concern each:

- `host`        this machine: memory bandwidth (measured once, cached), peak RSS
- `bound`       bytes read per decoded token and the bandwidth bound (a device profile, this machine)
- `report`      the report's data model: timings, per-operator rows, coverage; JSON and text
- `executorch`  live `.pte` runs with ETDump, and the analysis of an ETDump (+ ETRecord) file
- `onnxruntime` live `.onnx`/`.ort` runs with ORT's profiler, and the analysis of its JSON profile
- `html`        the single-file HTML report (inline SVG charts)
- `artifact`    what ARTIFACT names: the file, its runtime, the model's shape numbers
- `run`         `profile_artifact`: one request -> the report dict (the command prints and writes it)

Building artifacts is `liftedge.lowering`; running them for verification is the targets'.
"""
