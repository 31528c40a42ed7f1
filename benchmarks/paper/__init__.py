"""Offline reproductions of the paper's figures 1-4 and table 1.

    python -m benchmarks.paper.perturbation [--quick] [--out DIR]
    python -m benchmarks.paper.growth [--quick] [--out DIR]
    python -m benchmarks.paper.depth [--quick] [--out DIR]
    python -m benchmarks.paper.sensitivity [--quick | --large] [--out DIR]

The first three write `<name>.md` and `<name>.png` into `--out` (by default
`benchmarks/results/`); `sensitivity` (figure 4 and table 1, on the four
tasks of `benchmarks.paper.tasks`) writes `sensitivity.png` and `table1.md`.
"""
