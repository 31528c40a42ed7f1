"""Offline reproductions of the paper's figures 1-3 on scikit-learn's digits.

    python -m benchmarks.paper.perturbation [--quick] [--out DIR]
    python -m benchmarks.paper.growth [--quick] [--out DIR]
    python -m benchmarks.paper.depth [--quick] [--out DIR]

Each writes `<name>.md` and `<name>.png` into `--out` (by default
`benchmarks/results/`).
"""
