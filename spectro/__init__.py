"""spectro: susceptibility spectroscopy of language models.

Data flows one way; each module imports only from its own stage or those
before it (tests/test_layout.py holds the exact order):

    config, rundir, features, device          the schema and small utilities
    -> model, neox, components, observables,  the language model (neox: the architecture adapter)
       corpus, data                           and its data
    -> sgld, sampling                         the sampler
    -> store                                  samples.zarr, susceptibilities.zarr (the only Zarr code)
    -> estimator, reliability, susceptibilities
    -> clusters, modes, roles, stability
    -> sae
    -> report, sweep
    -> pipeline, service, cli                 orchestration (service: the only Ray actors)
"""

__version__ = "0.1.0"
