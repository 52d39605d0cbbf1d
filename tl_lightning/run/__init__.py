"""The machinery around a run: everything ``train.py``, ``predict.py``, ``export.py`` and the scripts call.

``pipeline`` (``train(cfg)``: the only place that instantiates a config), ``config_checks`` (checks
before anything is built), ``checkpointing`` (atomic, self-describing checkpoints; old ones upgraded),
``lock`` (one run per directory), ``guards`` (stop on a non-finite loss), ``hydra_callbacks``,
``feature_cache`` (frozen-backbone features computed once), ``inference`` (rebuild a trained model to
predict and export), ``merge`` (task arithmetic on checkpoints) and ``source_checkpoint`` (a
backbone read back from an earlier run). Import the submodule you need; nothing is re-exported here.
"""
