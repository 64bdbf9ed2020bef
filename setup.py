"""The wheel ships what the console scripts read at run time besides the code: `conf/` (with the experiment
presets), `data/` (FLORES-200, NTREX-128, TICO-19) and `tests/assets/` (the tokenizers and configs of the tiny
test models), under `ladm/_shipped/` with the checkout's layout (see `ladm.REPO_ROOT`)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("conf", "data", "tests/assets")


class BuildWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout itself
            return
        target = Path(self.build_lib) / "ladm" / "_shipped"
        for relative in SHIPPED:
            shutil.copytree(Path(relative), target / relative, symlinks=False, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithShippedFiles})
