"""The embedded demo: a generated corpus (general text + a fictional finance domain) that `lmdistill demo`
trains a teacher on and distills into a smaller student. `corpus.write_demo_data` writes its JSONL files."""
