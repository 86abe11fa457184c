"""Recorded teacher outputs, so stages can train without the teacher in memory.

    cache-teacher   train/teacher_commands.cache_teacher -> cache.build_cache: top-k log-probs per counted token in
                    checksummed, resumable safetensors shards + manifest.json (capture.py, packing.py, manifest.py)
    teacher: cache  stage.open_stage_cache -> reader.CacheLookup (checks tokenizer, max_length, data fingerprints;
                    looks rows up by example id)
    generate        train/teacher_commands.generate -> generate.generate_responses (sampling.py: exactly the
                    configured sampling settings): resumable JSONL with provenance
    teacher: generations
                    stage.stage_training_sources -> generate.load_generations (CE on the teacher's text, plus logit
                    KD from a live teacher)
    teacher.endpoint
                    endpoint.py: the teacher on a vLLM server, for both commands above; in `run`,
                    served_scoring.ServedScorer gives stages its top-k over each batch's own tokens (a policy stage's
                    samples too) as they train, read by the trainer as a cache is
    several processes (torchrun): both commands split their shards / batches (ranks.py); the main process merges
                    the per-process manifest parts and generations parts after a barrier
"""
