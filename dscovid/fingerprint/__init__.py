"""The dataset fingerprint (DESIGN.md §4): ``extractor.extract_fingerprint`` writes ``dataset_fingerprint.json``."""
