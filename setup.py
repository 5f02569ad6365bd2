"""Build hook: generate the gRPC/protobuf Python code from protos/ into kimivl/v1.

The generated files are not committed; every build (wheel, sdist or editable) makes
them from protos/ with grpcio-tools (a build requirement) before setuptools looks for
the kimivl.v1 package.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
from gen_protos import generate  # noqa: E402

generate()
setup()
