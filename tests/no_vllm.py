"""`kimivl` with vLLM made unimportable, as on a machine where it does not run.

usage: python tests/no_vllm.py serve inference --engine transformers ...
"""
import sys

sys.modules["vllm"] = None  # every `import vllm` / `import vllm.x` now raises ImportError

from kimivl.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
