"""The results folder (docs/formats.md §6): ``checkpoint`` (what a fold's checkpoint holds, written atomically and
read with ``weights_only=True``) and ``model_folder`` (the ``<Trainer>__<configuration>/fold_K/`` layout)."""
