"""Loads the engine probe (kimivl_engine_probe.py, beside this file) when KIMIVL_ENGINE_PROBE_DIR
is set: put this folder on PYTHONPATH to probe every vLLM engine core started beneath."""
import os

if os.environ.get("KIMIVL_ENGINE_PROBE_DIR"):
    import kimivl_engine_probe

    kimivl_engine_probe.install()
