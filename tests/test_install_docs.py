"""The README's install block: CPU-only users get PyTorch's CPU build, not 3 GB of CUDA."""

from __future__ import annotations

import re

from ml_engine.run.locations import PROJECT_ROOT

CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _install_block() -> list[str]:
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("## Install and run", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block under 'Install and run'"
    return block.group(1).splitlines()


def test_the_install_gives_the_cpu_build_beside_the_default_one() -> None:
    torch_lines = [line for line in _install_block() if line.startswith("pip install torch")]
    cpu = [line for line in torch_lines if CPU_INDEX in line]
    default = [line for line in torch_lines if "--index-url" not in line]
    assert len(cpu) == 1 and len(default) == 1, torch_lines
    # the same versions either way, the ones CI installs
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    pins = re.search(r"pip install -q (torch==\S+ torchvision==\S+)", ci).group(1)
    assert pins in cpu[0] and pins in default[0]


def test_the_readme_says_which_build_to_pick() -> None:
    block = "\n".join(_install_block())
    assert "without an NVIDIA GPU" in block and "with an NVIDIA GPU" in block
