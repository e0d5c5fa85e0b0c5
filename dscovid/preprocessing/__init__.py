"""Preprocessing (docs/preprocessing.md): ``orientation`` (canonical axis order), ``resampling``,
``lung`` (the built-in lung segmentation), ``lung_cache`` (lung masks made once per case) and
``preprocessor`` (``preprocess_image``, ``restore_to_original``, ``preprocess_dataset``)."""
