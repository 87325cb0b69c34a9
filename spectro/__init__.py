"""spectro: susceptibility spectroscopy of language models.

Data flows one way; each module imports only from upstream of itself:

    config -> model, data -> components -> observables -> sgld -> sampling
           -> store -> service -> estimator/susceptibilities -> clusters -> report
"""

__version__ = "0.1.0"
