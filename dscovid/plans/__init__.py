"""Plans, the contract between the stages (docs/formats.md §3): ``schema`` (validation, ``load_plans`` and the
``Configuration`` accessor), ``model_config`` (the ``network`` and ``training.loss`` sections as dataclasses) and
``presets`` (the shipped ``plans/*.json``)."""
