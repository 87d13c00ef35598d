"""Turn a target string into the user's callables.

Accepted forms, as in the 2012 tool: ``tasks.py``, ``path/to/tasks.py``, ``pkg.module``,
``pkg.module:function`` and ``path/tasks.py:function``. Without ``:function`` the default names
apply (``get_jobs``, ``handle_job``, ``count_jobs``, ``init_worker``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from .errors import TargetError

GET_JOBS = "get_jobs"
HANDLE_JOB = "handle_job"
COUNT_JOBS = "count_jobs"
INIT_WORKER = "init_worker"


class Target(NamedTuple):
    """A parsed target: where the module is and which function was named, if any."""

    spec: str
    module_ref: str
    function: str | None
    is_path: bool

    @property
    def source(self) -> str:
        """What the run is of: the tasks file's absolute path, or the module's name."""
        base = os.path.abspath(self.module_ref) if self.is_path else self.module_ref
        return base + (f":{self.function}" if self.function else "")

    @property
    def label(self) -> str:
        """A short name for file names and messages: ``tasks`` for ``jobs/tasks.py``."""
        base = Path(self.module_ref).stem if self.is_path else self.module_ref
        return base + (f"-{self.function}" if self.function else "")


def parse_target(spec: str) -> Target:
    """Split ``module:function`` and tell a file path from a dotted module name."""
    if not spec:
        raise TargetError("no target given: name a tasks file such as tasks.py")
    module_ref, sep, function = spec.rpartition(":")
    if not sep or not function.isidentifier():
        module_ref, function = spec, ""
    is_path = module_ref.endswith(".py") or os.sep in module_ref or Path(module_ref).is_file()
    return Target(spec, module_ref, function or None, is_path)


_loaded: dict[str, ModuleType] = {}


def load_module(target: Target) -> ModuleType:
    """Import the target's module once per process; errors become one-line TargetErrors."""
    key = os.path.abspath(target.module_ref) if target.is_path else target.module_ref
    if key in _loaded:
        return _loaded[key]
    module = _load_path(target.module_ref) if target.is_path else _load_dotted(target.module_ref)
    _loaded[key] = module
    return module


def _one_line(text: object) -> str:
    """Error texts go on one line of the CLI's output, whatever the exception put in them."""
    return " ".join(str(text).split())


def _module_name(path: Path) -> str:
    """The name a tasks file is registered under, the same in the master and every worker.

    Its stem, as ``python tasks.py`` would import it, unless that would replace a module this
    process relies on (a ``time.py`` or ``queue.py`` of tasks must not become ``time``).
    """
    stem = path.stem
    if not stem.isidentifier():
        return "taskmaster_tasks"
    existing = sys.modules.get(stem)
    clash = existing is not None and (
        getattr(existing, "__file__", None) is None
        or os.path.realpath(existing.__file__ or "") != os.path.realpath(path)
    )
    if stem in sys.stdlib_module_names or clash:
        return f"taskmaster_tasks_{stem}"
    return stem


def _load_path(path_text: str) -> ModuleType:
    path = Path(path_text)
    if not path.is_file():
        raise TargetError(f"{path_text}: no such file")
    directory = str(path.resolve().parent)
    # Let tasks.py import its sibling modules, as `python tasks.py` would.
    if directory not in sys.path:
        sys.path.insert(0, directory)
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"{path_text}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so that pickle finds classes the file defines, under its name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _import_failed(path_text, exc) from exc
    return module


def _import_failed(name: str, exc: BaseException) -> TargetError:
    if isinstance(exc, SyntaxError):
        # The file at fault may be a module the tasks file imports, not the tasks file.
        where = _shown_path(exc.filename, name)
        return TargetError(f"{where}:{exc.lineno}: syntax error: {_one_line(exc.msg)}")
    if isinstance(exc, SystemExit):
        return TargetError(f"{name}: exited while being imported (exit status {exc.code!r})")
    return TargetError(f"{name}: failed to import: {type(exc).__name__}: {_one_line(exc)}")


def _shown_path(filename: str | None, name: str) -> str:
    """``filename`` as the user would write it: the target's own spelling, or relative."""
    if not filename:
        return name
    if os.path.realpath(filename) == os.path.realpath(name):
        return name
    relative = os.path.relpath(filename)
    return filename if relative.startswith("..") else relative


def _load_dotted(name: str) -> ModuleType:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only when `name` itself (or a package on its path) is missing: a module the target
        # imports that is missing is an import error of the target, said as such.
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise TargetError(f"{name}: no such module or file") from exc
        raise _import_failed(name, exc) from exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise _import_failed(name, exc) from exc


def load_function(target: Target, name: str, *, required: bool = True) -> Callable[..., Any] | None:
    """Return ``name`` from the target's module (``None`` if optional and missing)."""
    module = load_module(target)
    func = getattr(module, name, None)
    if func is None:
        if required:
            raise TargetError(f"{target.module_ref}: no function {name}() defined")
        return None
    if not callable(func):
        raise TargetError(f"{target.module_ref}: {name} is not callable")
    return func  # type: ignore[no-any-return]


class MasterCallables(NamedTuple):
    get_jobs: Callable[..., Any]
    count_jobs: Callable[..., Any] | None


class WorkerCallables(NamedTuple):
    handle_job: Callable[..., Any]
    init_worker: Callable[[], Any] | None


def master_callables(target: Target, get_jobs_name: str | None = None) -> MasterCallables:
    """The master's side: ``get_jobs`` (or ``target:function``) and the optional ``count_jobs``."""
    name = get_jobs_name or target.function or GET_JOBS
    get_jobs = load_function(target, name)
    assert get_jobs is not None
    return MasterCallables(get_jobs, load_function(target, COUNT_JOBS, required=False))


def worker_callables(target: Target, handle_job_name: str | None = None) -> WorkerCallables:
    """The worker's side: ``handle_job`` (or the name given) and the optional ``init_worker``."""
    handle = load_function(target, handle_job_name or HANDLE_JOB)
    assert handle is not None
    return WorkerCallables(handle, load_function(target, INIT_WORKER, required=False))


def accepts_last(get_jobs: Callable[..., Any]) -> bool:
    """Whether ``get_jobs`` can be told where to resume: a ``last`` parameter, by keyword.

    A bare ``**kwargs`` does not count: such a function never asked for ``last``, so it is
    resumed by replaying its already-done prefix instead.
    """
    import inspect  # 3 ms to import, and only a resume asks

    try:
        params = inspect.signature(get_jobs).parameters
    except (TypeError, ValueError):
        return False
    last = params.get("last")
    return last is not None and last.kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    )


def check_kwargs(func: Callable[..., Any], kwargs: dict[str, str]) -> None:
    """Refuse ``key=value`` arguments ``func`` cannot be called with, before anything runs.

    Read from the function's code object (``inspect`` costs 3 ms of every start); other
    callables are left to fail when called, as before. ``last`` is ours to pass, not the
    user's, so it is never reported missing.
    """
    code = getattr(func, "__code__", None)
    if code is None or not hasattr(func, "__defaults__"):
        return
    name = f"{Path(code.co_filename).name}: {getattr(func, '__name__', GET_JOBS)}"
    positional = code.co_varnames[: code.co_argcount]
    keyword_only = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
    by_keyword = positional[code.co_posonlyargcount :] + keyword_only
    if not code.co_flags & 0x08:  # CO_VARKEYWORDS: no **kwargs to take the rest
        unknown = [key for key in kwargs if key not in by_keyword]
        if unknown:
            takes = ", ".join(f"{p}=" for p in by_keyword if p != "last") or "none"
            raise TargetError(
                f"{name}() takes no argument {unknown[0]}= (it takes {takes}): "
                "check the key=value arguments"
            )
    defaults = func.__defaults__ or ()
    required = list(positional[: len(positional) - len(defaults)])
    required += [p for p in keyword_only if p not in (func.__kwdefaults__ or {})]
    missing = [p for p in required if p not in kwargs and p != "last"]
    if missing:
        raise TargetError(f"{name}() needs {missing[0]}=…: pass it as a key=value argument")
