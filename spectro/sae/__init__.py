"""Sparse autoencoder features as a check on susceptibility clusters
(docs/method.md).

Three steps, used in this order by the `sae` stage
(`spectro.sae.stage.sae_stage`, called by `spectro.pipeline.run_sae`), one module each:

    model        the SAE (SAELens conventions) and its on-disk layout (cfg.json + safetensors)
    activations  the language model's activations at a site; FVE and spliced losses of an SAE
    training     a TopK SAE trained on sampling-distribution activations
    matching     each cluster's best-F1 feature, and the matched fraction against permuted labels
    stage        the stage itself: reads clusters.json, writes sae.json and sae/

The public names are re-exported here (`from spectro import sae; sae.train_topk(...)`).
"""

from spectro.sae.activations import collect_activations, fve, spliced_losses
from spectro.sae.matching import cluster_examples, match_clusters, probe_features, top_tokens
from spectro.sae.model import (ARCHITECTURES, CFG_FILE, POSITIONS, SAE, SITES, WEIGHTS_FILE, hook_name, load_sae,
                               parse_hook_name, save_sae)
from spectro.sae.training import TrainSettings, train_topk

__all__ = ["ARCHITECTURES", "CFG_FILE", "POSITIONS", "SAE", "SITES", "WEIGHTS_FILE", "TrainSettings",
           "cluster_examples", "collect_activations", "fve", "hook_name", "load_sae", "match_clusters",
           "parse_hook_name", "probe_features", "save_sae", "spliced_losses", "top_tokens", "train_topk"]
