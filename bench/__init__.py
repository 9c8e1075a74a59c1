"""Benchmarks: scripts, not tests (STYLE rule 16). Every result records GPU, torch, config, commit.

`python -m bench.decoder --help` compares eager, torch.compile default, reduce-overhead, whole-model
CUDA graphs and piecewise on the reference decoder; see bench/README.md.
"""
