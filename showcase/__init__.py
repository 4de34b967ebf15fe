"""The showcase: `make demo` (demo.py), its report (report.py) and the side-by-side benchmark (benchmark.py).

Run from the repository root: `python -m showcase.demo`, `python -m showcase.report demo_out`,
`python -m showcase.benchmark`.
"""
