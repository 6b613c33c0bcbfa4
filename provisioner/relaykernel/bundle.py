"""Pack the VM side (relaykernel.common and relaykernel.vm) into one self-contained Python program.

The program carries every module's source, puts an importer for them first on ``sys.meta_path`` and, for
``vm_program``, runs one module's ``main()``. It needs only the standard library of Python 3.8 or newer, so a
bare VM (``python3 -I -S``, nothing installed) runs exactly the laptop's code: no package index, no name to squat.
"""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import json
import zlib
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

from .common.errors import ConfigError

PACKAGES = ("common", "vm")
ROOT_SOURCE = '"""relaykernel as shipped to a VM: only relaykernel.common and relaykernel.vm are here."""\n'
OLDEST_PYTHON = (3, 8)

# The importer, as it runs on the VM (Python 3.8 syntax, standard library only). MODULES maps a module name to
# [file name, is package, source]. Sources go into linecache, so tracebacks show the real lines.
LOADER = '''
import importlib.abc, importlib.util, linecache, sys, traceback


class RelaykernelBundle(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports relaykernel.* from the sources this program carries, never from the disk."""

    def __init__(self, modules, version):
        self.modules = modules
        self.version = version

    def find_spec(self, name, path=None, target=None):
        if name != "relaykernel" and not name.startswith("relaykernel."):
            return None
        if name not in self.modules:
            raise ModuleNotFoundError("%s is not part of the VM side of relaykernel" % name, name=name)
        filename, is_package, _ = self.modules[name]
        spec = importlib.util.spec_from_loader(name, self, origin=filename, is_package=is_package)
        spec.has_location = True
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        filename, _, source = self.modules[module.__name__]
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)

    def get_source(self, name):
        return self.modules[name][2]

    def is_package(self, name):
        return self.modules[name][1]

    def install(self):
        for finder in list(sys.meta_path):
            if type(finder).__name__ == type(self).__name__:
                sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "relaykernel" or n.startswith("relaykernel.")]:
            del sys.modules[name]
        for filename, _, source in self.modules.values():
            lines = source.splitlines(True)
            linecache.cache[filename] = (len(source), None, lines, filename)
        sys.meta_path.insert(0, self)
        return self


def run_main(entry):
    """Import ENTRY and return its main()'s exit status; a failure prints its traceback and returns 1."""
    try:
        return importlib.import_module(entry).main()
    except Exception:
        traceback.print_exc()
        return 1
'''


@dataclass(frozen=True)
class Module:
    """One module as it travels: its dotted name, the file name tracebacks show, whether a package, its source."""

    name: str
    filename: str
    is_package: bool
    source: str


@functools.cache
def vm_modules() -> tuple[Module, ...]:
    """Every module of relaykernel.common and relaykernel.vm (subpackages included) and an empty root package."""
    found = [Module("relaykernel", "relaykernel/__init__.py", True, ROOT_SOURCE)]
    root = resources.files("relaykernel")
    for package in PACKAGES:
        found += _walk(root / package, f"relaykernel.{package}", f"relaykernel/{package}")
    return tuple(found)


def _walk(directory: Traversable, name: str, path: str) -> list[Module]:
    init = directory / "__init__.py"
    if not init.is_file():
        raise ConfigError(f"{path} is not a package (no __init__.py): the VM side cannot be bundled")
    found = [Module(name, f"{path}/__init__.py", True, init.read_text(encoding="utf-8"))]
    for child in sorted(directory.iterdir(), key=lambda entry: entry.name):
        if child.is_dir() and (child / "__init__.py").is_file():
            found += _walk(child, f"{name}.{child.name}", f"{path}/{child.name}")
        elif child.is_file() and child.name.endswith(".py") and child.name != "__init__.py":
            stem = child.name[: -len(".py")]
            found.append(Module(f"{name}.{stem}", f"{path}/{child.name}", False, child.read_text(encoding="utf-8")))
    return found


def _modules_json(modules: tuple[Module, ...]) -> str:
    table = {module.name: [module.filename, module.is_package, module.source] for module in modules}
    return json.dumps(table, sort_keys=True, separators=(",", ":"))


def _version() -> str:
    from .common.version import __version__

    return __version__


@functools.cache  # the installed sources do not change while relaykernel runs
def importer_program(*, compressed: bool = True, modules: tuple[Module, ...] | None = None) -> bytes:
    """A program that installs the bundle's importer (replacing an older one) and drops cached relaykernel modules."""
    table = _modules_json(vm_modules() if modules is None else modules)
    if compressed:
        blob = base64.b64encode(zlib.compress(table.encode(), 9)).decode("ascii")
        data = f"json.loads(zlib.decompress(base64.b64decode({blob!r})).decode())"
        imports = "import base64, json, zlib\n"
    else:
        data, imports = f"json.loads({table!r})", "import json\n"
    source = (f"# relaykernel {_version()}: the VM side, standard library only\n{imports}{LOADER}\n"
              f"RelaykernelBundle({data}, {_version()!r}).install()\n")
    return source.encode("utf-8")


@functools.lru_cache(maxsize=16)
def vm_program(entry: str) -> bytes:
    """ENTRY's ``main()`` as a program for ``BOOTSTRAP`` (zlib: its wire form), exiting with what main returns.

    It carries ``relaykernel.common`` and the modules of ENTRY's own package (all of ``relaykernel.vm`` for a module of
    ``vm`` itself, only ``vm.supervisor`` for the supervisor), so a slow uplink sends what the program can import and
    nothing more (the supervisor: 22 KB instead of 63 KB). Built once per process.
    """
    if not entry.startswith("relaykernel.") or entry not in {module.name for module in vm_modules()}:
        raise ConfigError(f"{entry} is not a module of the VM side (relaykernel.vm / relaykernel.common)")
    source = importer_program(compressed=False, modules=_needed_by(entry)) + f"sys.exit(run_main({entry!r}))\n".encode()
    return zlib.compress(source, 9)


def _needed_by(entry: str) -> tuple[Module, ...]:
    package = entry.rpartition(".")[0]
    if package == "relaykernel.vm":
        return vm_modules()
    parents = {package.rsplit(".", depth)[0] for depth in range(package.count(".") + 1)}
    return tuple(module for module in vm_modules()
                 if module.name in parents or module.name.startswith(("relaykernel.common", package + ".")))


# For short one-shot commands that need no stdin: the program rides in argv (no secret may go this way).
@dataclass(frozen=True)
class CellPayload:
    """The importer program for a notebook cell: zlib + base64 in one line, and the sha256 of the program."""

    line: str
    sha256: str


def cell_payload() -> CellPayload:
    """The importer program as one opaque line (the cell checks its sha256 before running it)."""
    program = importer_program(compressed=False)
    line = base64.b64encode(zlib.compress(program, 9)).decode("ascii")
    return CellPayload(line=line, sha256=hashlib.sha256(program).hexdigest())


def check_syntax(feature_version: tuple[int, int] = OLDEST_PYTHON) -> list[str]:
    """Parse the loader and every bundled module as Python ``feature_version``; return the module names.

    Raises SyntaxError naming the module. (A parse with feature_version misses some newer syntax; the tests
    also run the program itself on the oldest Python.)
    """
    checked = []
    for module in [Module("<loader>", "relaykernel/bundle.py:LOADER", False, LOADER), *vm_modules()]:
        ast.parse(module.source, filename=module.filename, feature_version=feature_version)
        checked.append(module.name)
    return checked
