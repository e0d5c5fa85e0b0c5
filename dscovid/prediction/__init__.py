"""Prediction, the stage behind ``dscovid_predict`` (docs/prediction.md): ``inputs`` (which scans, and reading
one), ``export`` (a case's files on its original grid), ``lesion_report`` (the per-case lesion measurements),
``output_folder`` (which run wrote the folder, ``predictions.json`` / ``.csv``), ``predict`` (``predict_cases``:
the cases through the pipelined readers, networks and writers) and ``montage`` (the ``--png`` pictures)."""
