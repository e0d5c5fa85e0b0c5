"""Preprocessing (DESIGN.md §5, docs/preprocessing.md): ``orientation`` (canonical axis order), ``resampling``,
``lung_mask`` (the built-in lung segmentation), ``lung_cache`` (lung masks made once per case) and
``preprocessor`` (``preprocess_image``, ``restore_to_original``, ``preprocess_dataset``)."""
