"""Planning (DESIGN.md §4, docs/preprocessing.md §2): ``presets`` (the shipped ``plans/*.json``), ``budget`` (memory
and compute model), ``planner`` (fingerprint → plans), ``plans`` (validation and the ``Configuration`` accessor),
``plan_and_preprocess`` (the whole first stage)."""
