"""The install commands (README.md and the docs' install page): CPU-only users get PyTorch's CPU
build, not 3 GB of CUDA, and the versions are the ones CI installs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ml_engine.run.locations import PROJECT_ROOT

CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
README = PROJECT_ROOT / "README.md"
INSTALL_PAGE = PROJECT_ROOT / "docs" / "install.md"


def _install_blocks(page: Path) -> list[list[str]]:
    """The page's bash blocks that install torch."""
    blocks = re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    return [block.splitlines() for block in blocks if "pip install torch" in block]


@pytest.fixture(params=[README, INSTALL_PAGE], ids=lambda page: page.name)
def install_block(request: pytest.FixtureRequest) -> list[str]:
    page = request.param
    if page == INSTALL_PAGE:
        assert page.is_file(), "docs/install.md is the install page of the docs site"
    blocks = _install_blocks(page)
    if not blocks and page == README:
        # a short README may leave the install to the docs, but then says where it is
        assert "docs/install.md" in page.read_text(encoding="utf-8"), "README: no install"
        pytest.skip("the README links to docs/install.md instead")
    assert len(blocks) == 1, f"{page.name}: {len(blocks)} bash blocks install torch, want one"
    return blocks[0]


def test_the_install_gives_the_cpu_build_beside_the_default_one(install_block: list[str]) -> None:
    torch_lines = [line for line in install_block if line.startswith("pip install torch")]
    cpu = [line for line in torch_lines if CPU_INDEX in line]
    default = [line for line in torch_lines if "--index-url" not in line]
    assert len(cpu) == 1 and len(default) == 1, torch_lines
    # the same versions either way, the ones CI installs
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    pins = re.search(r"pip install -q (torch==\S+ torchvision==\S+)", ci).group(1)
    assert pins in cpu[0] and pins in default[0]


def test_the_install_says_which_build_to_pick(install_block: list[str]) -> None:
    block = "\n".join(install_block)
    assert "without an NVIDIA GPU" in block and "with an NVIDIA GPU" in block


def test_the_install_then_installs_the_project(install_block: list[str]) -> None:
    assert any(re.match(r'pip install -e "\.\[dev\]"', line) for line in install_block)
