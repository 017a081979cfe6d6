"""Task-aware cultural data synthesis: queries -> retrieval -> LLM samples -> validation -> JSONL.

Run it with `moa synth CONFIG.yaml`; `moa.synth.pipeline.run` is the library entry point.
"""
