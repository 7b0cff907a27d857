"""nano-LLM's benchmarks, one file per section; run them with `python -m bench` (bench/__main__.py)."""
