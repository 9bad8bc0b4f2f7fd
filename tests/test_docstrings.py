"""Every public function, class and method of the package has a docstring, with an ``Args:`` section naming each
of its parameters (diffusers' convention). Methods that override a base class's (Lightning hooks, ``forward``,
a protocol's methods) inherit their documentation and are left out."""

from __future__ import annotations

import importlib
import inspect
import re

from tests.conftest import REPO
from tests.test_architecture import package_modules


def _parameters(function) -> list[str]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    return [
        name
        for name, p in signature.parameters.items()
        if name not in ("self", "cls")
        and p.kind is not inspect.Parameter.VAR_POSITIONAL
        and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def _undocumented(doc: str | None, parameters: list[str]) -> list[str]:
    if not doc:
        return ["<no docstring>"]
    if not parameters:
        return []
    if "Args:" not in doc:
        return ["<no Args: section>", *parameters]
    section = doc.split("Args:", 1)[1]
    return [name for name in parameters if not re.search(rf"^\s+\**{re.escape(name)}\b[^:\n]*:", section, re.M)]


def _overrides(cls: type, name: str) -> bool:
    return any(name in vars(base) for base in cls.__mro__[1:] if base is not object)


def _own_doc(obj) -> str | None:
    return obj.__doc__ if isinstance(obj.__doc__, str) else None


def public_definitions_without_args() -> list[str]:
    problems = []
    for module_name in package_modules():
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            where = f"{module_name}.{name}"
            if inspect.isfunction(obj):
                missing = _undocumented(_own_doc(obj), _parameters(obj))
            elif inspect.isclass(obj):
                if issubclass(obj, BaseException):
                    missing = [] if _own_doc(obj) else ["<no docstring>"]
                else:
                    init = vars(obj).get("__init__")
                    parameters = (
                        _parameters(obj)
                        if init is not None or "__dataclass_fields__" in vars(obj) or "_fields" in vars(obj)
                        else []
                    )
                    doc = "\n".join(d for d in (_own_doc(obj), _own_doc(init) if init else None) if d)
                    missing = _undocumented(doc or None, parameters)
                for attr, member in vars(obj).items():
                    if attr.startswith("_") or _overrides(obj, attr):
                        continue
                    function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                    if not inspect.isfunction(function):
                        continue
                    more = _undocumented(
                        _own_doc(function), [] if isinstance(member, property) else _parameters(function)
                    )
                    if more:
                        problems.append(f"{where}.{attr}: {', '.join(more)}")
            else:
                continue
            if missing:
                problems.append(f"{where}: {', '.join(missing)}")
    return problems


def test_every_public_definition_documents_its_arguments():
    problems = public_definitions_without_args()
    assert not problems, f"{len(problems)} public definitions lack a docstring or Args: entries:\n" + "\n".join(
        problems
    )


def test_the_check_reads_args_sections_as_written():
    def documented(path: str, mode: int = 0) -> None:
        """Do it.

        Args:
            path: where.
            mode: how (a longer
                description).
        """

    def half(path: str, mode: int = 0) -> None:
        """Do it.

        Args:
            path: where; mode is not a heading here.
        """

    assert _undocumented(documented.__doc__, _parameters(documented)) == []
    assert _undocumented(half.__doc__, _parameters(half)) == ["mode"]
    assert _undocumented("Do it.", ["path"]) == ["<no Args: section>", "path"]
    assert _undocumented(None, []) == ["<no docstring>"]


def test_the_readme_group_table_lists_every_config_group_and_option():
    """Every Hydra group under configs/ is a row of the README's table and every option of it is named there
    (``hydra/`` holds Hydra's own settings, ``sweep/`` W&B sweep files, ``anonymize/anonymize.yaml`` is anonymize.py's
    own config: each is described where it is used)."""
    import re

    readme = (REPO / "README.md").read_text()
    table = readme.split("| group | options | what it sets |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = set(re.findall(r"`([^`]+)`", cells[1]))
    configs = REPO / "configs"
    groups = {
        folder.relative_to(configs).as_posix(): {path.stem for path in folder.glob("*.yaml")}
        for folder in configs.rglob("*")
        if folder.is_dir() and any(folder.glob("*.yaml"))
    }
    groups = {
        name: options
        for name, options in groups.items()
        if name.split("/")[0] not in ("hydra", "sweep") and name != "anonymize"
    }
    assert set(rows) == set(groups), (sorted(rows), sorted(groups))
    missing = {name: sorted(options - rows[name]) for name, options in groups.items() if options - rows[name]}
    assert not missing, missing


def test_the_layout_guide_names_every_module_of_the_package():
    layout = (REPO / "docs" / "layout.md").read_text()
    package = REPO / "camouflage_train"
    missing = [
        path.relative_to(package).as_posix()
        for path in sorted(package.rglob("*.py"))
        if path.name != "__init__.py" and "weights" not in path.parts and path.name not in layout
    ]
    assert not missing, missing
