"""Builds the shim with CMake and ships it inside the package; cffi builds the helper module."""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

SHIM = "libksmpreload.so"


class BuildWithShim(build_py):
    def run(self):
        super().run()
        if os.environ.get("KSMPRELOAD_BUILD_SHIM") == "0":  # the Debian package builds it with CMake
            return
        build_dir = os.path.abspath(os.path.join(self.build_temp_dir(), "shim"))
        subprocess.check_call(
            ["cmake", "-S", ".", "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DKSMPRELOAD_TESTS=OFF"]
        )
        subprocess.check_call(["cmake", "--build", build_dir, "--target", "ksmpreload"])
        target = os.path.join(self.build_lib, "ksmpreload", SHIM)
        shutil.copyfile(os.path.join(build_dir, SHIM), target)

    def build_temp_dir(self):
        return self.get_finalized_command("build").build_temp


setup(cmdclass={"build_py": BuildWithShim}, cffi_modules=["python/build_native.py:ffibuilder"])
