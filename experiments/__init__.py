"""The study's experiments, one module each, regenerated from one command.

    python -m experiments list
    python -m experiments run NAME [--quick | --full] [--device cpu|cuda] [--seed S]
                                   [--out DIR] [--force]
    python -m experiments all [--quick | --full] ...

Each experiment writes ``NAME.json`` (configuration, seed, device, versions, timings, results)
and its figures (PNG and PDF) into ``figures/`` (or ``--out``); see
:mod:`experiments.registry` for the module interface and the cache.
"""
