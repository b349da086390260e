"""Build hook: generate the gRPC Python code from protos/ before packaging."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    def run(self):
        spec = importlib.util.spec_from_file_location(
            "_codegen", ROOT / "encoder_service" / "proto" / "codegen.py"
        )
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)
        codegen.generate(ROOT / "protos", ROOT / "encoder_service" / "proto")
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
