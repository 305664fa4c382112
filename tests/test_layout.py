"""The one-way import rule of the package layout (README, "Layout"), checked on the source text.

Every ``dual_lm`` import, at module level or inside a function, is read with ``ast``, so a
function-local import cannot hide an upward dependency.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dual_lm"
LAYERS = ("data", "training", "inference", "evaluation", "serving", "studies")
# What each layer may import besides the core and itself.
ALLOWED = {
    "core": set(),
    "data": set(),
    "training": {"data"},
    "inference": set(),
    "evaluation": {"inference"},
    "serving": {"inference"},
    "studies": set(LAYERS),
    "cli": set(LAYERS),
}


def layer_of(module: str) -> str:
    """``dual_lm.training.train`` -> ``training``; other top-level modules are core (cli and `__main__` excepted)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "cli" if parts[1:2] in (["cli"], ["__main__"]) else "core"


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dual_lm":
                found |= {f"dual_lm.{a.name}" for a in node.names}
            elif node.module.startswith("dual_lm."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dual_lm.")}
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def test_imports_go_one_way():
    broken = []
    for path in sorted(SRC.rglob("*.py")):
        me = module_name(path)
        mine = layer_of(me)
        for target in imports_of(path):
            theirs = layer_of(target)
            if theirs == "cli" and mine != "cli":
                broken.append(f"{me} imports {target} (nothing imports cli)")
            elif theirs not in ("core", mine) and theirs not in ALLOWED[mine]:
                broken.append(f"{me} ({mine}) imports {target} ({theirs})")
    assert not broken, "\n".join(broken)


def test_rule_sees_function_local_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from dual_lm.studies.plot import plot_run\n")
    assert imports_of(probe) == {"dual_lm.studies.plot"}
    assert layer_of("dual_lm.studies.plot") == "studies" and layer_of("dual_lm.config") == "core"


def test_every_module_is_in_a_known_layer():
    top = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert top == {*LAYERS, "cli"}


def test_help_imports_no_torch():
    """``dual-lm --help``, ``--version`` and every ``CMD --help`` answer without importing torch or
    transformers (so in well under a second). ``lm-eval --help`` is lm-eval's own help: it imports lm-eval,
    still without torch."""
    import subprocess
    import sys

    probe = """
import contextlib, io, sys
from dual_lm.cli import COMMANDS, main
for argv in [["--help"], ["--version"], *([c.name, "--help"] for c in COMMANDS)]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print(len(COMMANDS), 'torch' in sys.modules, 'transformers' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    count, *imported = out.split()
    assert int(count) > 15 and imported == ["False", "False"]


def test_model_classes_stay_importable_from_the_package():
    import dual_lm
    from dual_lm.modeling_dlm_llama import DLMLlamaForMaskedLM

    assert dual_lm.DLMLlamaForMaskedLM is DLMLlamaForMaskedLM
