"""The dataset fingerprint (docs/preprocessing.md §1): ``extractor.extract_fingerprint`` writes ``dataset_fingerprint.json``."""
