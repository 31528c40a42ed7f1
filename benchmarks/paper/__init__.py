"""Offline reproductions of the paper's figures 1-4 and table 1.

    python -m benchmarks.paper.perturbation [--quick] [--out DIR]
    python -m benchmarks.paper.growth [--quick] [--out DIR]
    python -m benchmarks.paper.depth [--quick] [--out DIR]
    python -m benchmarks.paper.sensitivity [--quick | --large] [--out DIR]

Each writes its run to `<name>.json` in `--out` (by default
`benchmarks/results/`), draws `<name>.png` from it and renders its tables
into `<name>.md` (`sensitivity`, figure 4 and table 1 on the four tasks of
`benchmarks.paper.tasks`: into `table1.md`) with `benchmarks.render`.
"""
