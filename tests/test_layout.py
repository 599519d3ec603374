"""The layering of docs/design.md (Architecture): what each package may import, and no import cycle in dtl/."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def module_imports(package: str) -> dict[str, set[str]]:
    """module -> the modules it imports anywhere in its file (top level and inside functions)."""
    files = {}
    for path in (REPO / package).rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports = {}
    for name, path in files.items():
        package_name = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package_name.split(".")[:len(package_name.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        imports[name] = found
    return imports


def test_the_library_imports_none_of_the_outer_layers():
    outer = ("pipeline", "sweeps", "tracking", "ray", "mlflow", "optuna", "dvc")
    offending = {module: sorted(t for t in targets if t.split(".")[0] in outer)
                 for module, targets in module_imports("dtl").items()}
    assert not {m: t for m, t in offending.items() if t}


def test_no_import_cycle_inside_the_library():
    imports = module_imports("dtl")
    graph = {module: {t for t in targets if t in imports and t != module} for module, targets in imports.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, " -> ".join([*path[path.index(target):], target])
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_schema_parses_and_validates_a_params_file_without_torch(tmp_path):
    import subprocess
    import sys

    params = tmp_path / "params.yaml"
    params.write_text("model: {method: lora, rank: 4}\ntraining: {epochs: 30, lr: 1e-4}\n"
                      "overrides: {digits: {start_block: 2, lr: 0.01}}\n")
    code = ("import sys, dtl.config as c\n"
            f"config = c.load_config({str(params)!r}, task='digits')\n"
            "assert (config.model.rank, config.training.lr, config.model.start_block) == (4, 0.01, 2), config\n"
            "try:\n"
            "    c.ExperimentConfig.from_dict({'training': {'lr': -1}})\n"
            "except c.ConfigError as err:\n"
            "    assert 'training.lr: expected a number > 0' in str(err), err\n"
            "else:\n"
            "    raise AssertionError('no error')\n"
            "loaded = [m for m in ('torch', 'timm', 'numpy', 'dtl.engine', 'dtl.cache') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_no_protocol_is_known_by_name_outside_its_module():
    import re

    from dtl.protocols import available_protocols

    names = "|".join(name for name in available_protocols() if name != "val")  # "val" is a split's name too
    comparison = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=|\bin\b)"""
                            r"|uses_list_files|\bprotocol\s*(==|!=)")
    found = []
    for package in ("dtl", "pipeline", "sweeps", "tracking", "benchmarks"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path.is_relative_to(REPO / "dtl" / "protocols"):
                continue
            found += [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                      for number, line in enumerate(path.read_text().splitlines(), 1) if comparison.search(line)]
    assert not found, "\n".join(found)
