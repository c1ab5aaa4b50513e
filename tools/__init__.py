"""Benchmarks, the full-size rehearsal, SemGen-Bench and workflow rendering: run from the repository root
(`python -m tools.NAME`). They import the library and the trainer; neither imports them, ComfyUI does not serve
them and installing the pack does not install them."""
