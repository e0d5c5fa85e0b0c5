"""Planning (docs/preprocessing.md §2): ``budget`` (memory and compute model), ``planner`` (fingerprint → plans),
``plan_and_preprocess`` (the whole first stage). The plans format itself is :mod:`dscovid.plans`."""
