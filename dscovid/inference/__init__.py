"""Inference (docs/prediction.md): ``model_loading`` (the folds of a results folder as networks), ``sliding_window``
(tiles over a volume, Gaussian or constant weights) and ``engine`` (every fold, plain and mirrored, over one
preprocessed scan). Reading scans and writing results is the prediction stage, :mod:`dscovid.prediction`."""
