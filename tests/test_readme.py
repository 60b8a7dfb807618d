"""The README is a tour: short, its first commands the ones CI runs, every link it and the docs
pages make pointing at a file (and heading) that exists."""

import os
import re

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
CI = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")


def _first_commands() -> list[str]:
  """The indented command lines under the README's first heading after the title."""
  block = README.split("## ", 2)[1]
  return [line.strip() for line in block.splitlines() if line.startswith("    ")]


def test_the_readme_is_a_tour_of_under_250_lines():
  assert README.count("\n") < 250


def test_the_readmes_install_quickstart_and_test_commands_are_the_ones_ci_runs():
  install, quickstart, tests = _first_commands()
  assert install == "pip install -e ."
  assert quickstart.startswith("python -m jaxlm.train --gin_file=experiments/quickstart.gin ")
  assert tests == 'pip install -e ".[test]" && pytest'
  # CI installs the project this way (quietly) and runs the same pytest (quietly), with the slow
  # tests included.
  assert re.search(r'^pip install --quiet -e "\.\[test\]"$', CI, re.M)
  assert re.search(r'^pytest -q -m "slow or not slow"( --no-loadscope-reorder)?$', CI, re.M)
  # The quickstart's experiment file is the one the end-to-end CLI test trains.
  assert "--gin_file=experiments/quickstart.gin" in (REPO_ROOT / "tests" / "conftest.py").read_text()


def _anchors(path) -> set[str]:
  text = open(path, encoding="utf-8").read()
  return {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
          for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_every_link_of_the_readme_and_the_docs_reaches_a_file_and_heading():
  pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
           *sorted((REPO_ROOT / "experiments").glob("*/README.md"))]
  broken = []
  for page in pages:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
      if re.match(r"^[a-z]+://", target):
        continue
      path, _, anchor = target.partition("#")
      full = os.path.normpath(os.path.join(page.parent, path)) if path else str(page)
      if not os.path.exists(full) or (anchor and full.endswith(".md")
                                      and anchor not in _anchors(full)):
        broken.append(f"{page.relative_to(REPO_ROOT)}: {target}")
  assert not broken, broken
