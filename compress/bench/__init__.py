"""`compress bench`: quality, speed and cost of any artifacts (float, GPTQ, bitsandbytes, ONNX) on the same
data and prompts. `run_bench(spec, artifacts, output)` in `stage.py`; the measurements in `quality.py` and
`speed.py`; the artifact kinds in `subjects.py`; results.json -> report.md and plots in `report.py`."""
