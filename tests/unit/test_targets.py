"""Targets: every accepted form loads the user's functions; every failure is one clear line."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskmaster import targets
from taskmaster.errors import TargetError, UsageError
from taskmaster.targets import (
    accepts_last,
    check_kwargs,
    load_function,
    master_callables,
    parse_target,
    worker_callables,
)

TASKS = """
def get_jobs(last=None, **kwargs):
    yield from range(last or 0, 3)

def handle_job(job):
    return job * 2

def count_jobs(**kwargs):
    return 3

def numbers(stop="5"):
    yield from range(int(stop))
"""


@pytest.fixture(autouse=True)
def isolated_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test imports its own files from its own directory, and leaves no trace."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(targets, "_loaded", {})
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    def write(relative: str, source: str) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    return write


def load_error(spec: str, name: str = "get_jobs") -> str:
    with pytest.raises(TargetError) as info:
        load_function(parse_target(spec), name)
    message = str(info.value)
    assert "\n" not in message, message
    assert isinstance(info.value, UsageError) and info.value.exit_status == 2
    return message


# -- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "module_ref", "function", "is_path", "label"),
    [
        ("tasks.py", "tasks.py", None, True, "tasks"),
        ("path/to/tasks.py", "path/to/tasks.py", None, True, "tasks"),
        ("pkg.module", "pkg.module", None, False, "pkg.module"),
        ("pkg.module:function", "pkg.module", "function", False, "pkg.module-function"),
        ("path/tasks.py:function", "path/tasks.py", "function", True, "tasks-function"),
        ("path/noext", "path/noext", None, True, "noext"),
    ],
)
def test_parse_target(
    spec: str, module_ref: str, function: str | None, is_path: bool, label: str
) -> None:
    target = parse_target(spec)
    assert (target.module_ref, target.function, target.is_path) == (module_ref, function, is_path)
    assert target.label == label


def test_parse_target_empty() -> None:
    with pytest.raises(TargetError, match="no target"):
        parse_target("")


def test_a_file_without_py_suffix_in_cwd_is_a_path(write: Callable[..., Path]) -> None:
    write("jobsfile", TASKS)
    assert parse_target("jobsfile").is_path


# -- loading -----------------------------------------------------------------------------


def test_tasks_py(write: Callable[..., Path]) -> None:
    write("tasks.py", TASKS)
    target = parse_target("tasks.py")
    master = master_callables(target)
    assert list(master.get_jobs()) == [0, 1, 2]
    assert master.count_jobs is not None and master.count_jobs() == 3
    worker = worker_callables(target)
    assert worker.handle_job(4) == 8
    assert worker.init_worker is None


def test_path_to_tasks_py_imports_its_siblings(write: Callable[..., Path]) -> None:
    write("path/to/helper.py", "FACTOR = 10\n")
    write(
        "path/to/tasks.py",
        """
        from helper import FACTOR

        def get_jobs():
            yield FACTOR

        def handle_job(job):
            return job
        """,
    )
    master = master_callables(parse_target("path/to/tasks.py"))
    assert list(master.get_jobs()) == [10]
    assert master.count_jobs is None


def test_path_tasks_py_function(write: Callable[..., Path]) -> None:
    write("path/tasks.py", TASKS)
    master = master_callables(parse_target("path/tasks.py:numbers"))
    assert list(master.get_jobs(stop="2")) == [0, 1]


def test_pkg_module(write: Callable[..., Path]) -> None:
    write("mypkg/__init__.py", "")
    write("mypkg/work.py", TASKS)
    target = parse_target("mypkg.work")
    assert list(master_callables(target).get_jobs()) == [0, 1, 2]
    assert worker_callables(target).handle_job(1) == 2


def test_pkg_module_function(write: Callable[..., Path]) -> None:
    write("mypkg2/__init__.py", "")
    write("mypkg2/work.py", TASKS)
    target = parse_target("mypkg2.work:numbers")
    assert list(master_callables(target).get_jobs(stop="3")) == [0, 1, 2]


def test_get_jobs_and_handle_job_names_override(write: Callable[..., Path]) -> None:
    write("tasks.py", TASKS)
    target = parse_target("tasks.py")
    assert list(master_callables(target, "numbers").get_jobs(stop="1")) == [0]
    assert worker_callables(target, "get_jobs").handle_job is master_callables(target).get_jobs


def test_module_is_loaded_once(write: Callable[..., Path]) -> None:
    write("tasks.py", TASKS + "\nLOADS = []\nLOADS.append(1)\n")
    first = targets.load_module(parse_target("tasks.py"))
    again = targets.load_module(parse_target("./tasks.py:numbers"))
    assert first is again and first.LOADS == [1]


def test_classes_in_a_tasks_file_pickle(write: Callable[..., Path]) -> None:
    import pickle

    write(
        "tasks.py",
        """
        class Job:
            def __init__(self, n):
                self.n = n

        def get_jobs():
            yield Job(1)
        """,
    )
    job = next(iter(master_callables(parse_target("tasks.py")).get_jobs()))
    assert pickle.loads(pickle.dumps(job)).n == 1


def test_a_tasks_file_named_like_a_stdlib_module_does_not_replace_it(
    write: Callable[..., Path],
) -> None:
    import queue

    write("queue.py", "def get_jobs():\n    yield 1\n")
    get_jobs = load_function(parse_target("queue.py"), "get_jobs")
    assert get_jobs is not None and list(get_jobs()) == [1]
    assert sys.modules["queue"] is queue
    assert hasattr(sys.modules["queue"], "Queue")


# -- errors ------------------------------------------------------------------------------


def test_missing_file() -> None:
    assert load_error("nowhere/tasks.py") == "nowhere/tasks.py: no such file"


def test_missing_module() -> None:
    assert load_error("no_such_module_here") == "no_such_module_here: no such module or file"


def test_missing_module_in_a_missing_package() -> None:
    assert "no such module" in load_error("no_such_pkg_here.work")


def test_syntax_error_names_file_and_line(write: Callable[..., Path]) -> None:
    write("tasks.py", "def get_jobs():\n    yield 1\n\ndef handle_job(job)\n    pass\n")
    message = load_error("tasks.py")
    assert message.startswith("tasks.py:4: syntax error"), message


def test_syntax_error_in_an_imported_module_names_that_module(write: Callable[..., Path]) -> None:
    write("helper_bad.py", "x = (\n")
    write("tasks.py", "import helper_bad\n\ndef get_jobs():\n    yield 1\n")
    message = load_error("tasks.py")
    assert "helper_bad.py:1: syntax error" in message, message


def test_syntax_error_in_a_dotted_module(write: Callable[..., Path]) -> None:
    write("badpkg/__init__.py", "")
    write("badpkg/work.py", "\n\nif True\n")
    message = load_error("badpkg.work")
    assert "work.py:3: syntax error" in message, message


def test_import_error(write: Callable[..., Path]) -> None:
    write("tasks.py", "import no_such_dependency_xyz\n")
    message = load_error("tasks.py")
    assert message.startswith("tasks.py: failed to import: ModuleNotFoundError"), message
    assert "no_such_dependency_xyz" in message


def test_import_error_in_a_dotted_module_is_not_called_missing(write: Callable[..., Path]) -> None:
    # `mymod` exists; what it imports (`my`, a prefix of its name) does not.
    write("mymod.py", "import my\n")
    message = load_error("mymod")
    assert "no such module or file" not in message, message
    assert "failed to import" in message and "'my'" in message


def test_exception_at_import_is_one_line(write: Callable[..., Path]) -> None:
    write("tasks.py", "raise RuntimeError('first line\\nsecond line')\n")
    message = load_error("tasks.py")
    assert message == "tasks.py: failed to import: RuntimeError: first line second line"


def test_sys_exit_at_import(write: Callable[..., Path]) -> None:
    write("tasks.py", "import sys\nsys.exit(3)\n")
    message = load_error("tasks.py")
    assert "exited while being imported" in message


def test_a_failed_import_can_be_retried(write: Callable[..., Path]) -> None:
    path = write("tasks.py", "raise ValueError('not yet')\n")
    load_error("tasks.py")
    path.write_text(TASKS)
    assert load_function(parse_target("tasks.py"), "handle_job") is not None


def test_missing_function(write: Callable[..., Path]) -> None:
    write("tasks.py", "def get_jobs():\n    yield 1\n")
    assert load_error("tasks.py", "handle_job") == "tasks.py: no function handle_job() defined"


def test_missing_named_function(write: Callable[..., Path]) -> None:
    write("tasks.py", TASKS)
    with pytest.raises(TargetError, match=r"^tasks.py: no function nope\(\) defined$"):
        master_callables(parse_target("tasks.py:nope"))


def test_optional_functions_may_be_missing(write: Callable[..., Path]) -> None:
    write("tasks.py", "def handle_job(job):\n    pass\n")
    target = parse_target("tasks.py")
    assert load_function(target, "init_worker", required=False) is None


def test_not_callable(write: Callable[..., Path]) -> None:
    write("tasks.py", "get_jobs = [1, 2, 3]\n")
    assert load_error("tasks.py") == "tasks.py: get_jobs is not callable"


def test_optional_but_not_callable_is_an_error(write: Callable[..., Path]) -> None:
    write("tasks.py", "def get_jobs():\n    yield 1\n\ncount_jobs = 10\n")
    with pytest.raises(TargetError, match="count_jobs is not callable"):
        master_callables(parse_target("tasks.py"))


# -- signatures --------------------------------------------------------------------------


def with_last(last=None):  # type: ignore[no-untyped-def]
    yield last


def with_last_and_kwargs(n="3", last=None, **kwargs):  # type: ignore[no-untyped-def]
    yield last


def keyword_only_last(*, last=0):  # type: ignore[no-untyped-def]
    yield last


def positional_only_last(last=None, /):  # type: ignore[no-untyped-def]
    yield last


def no_last():  # type: ignore[no-untyped-def]
    yield 1


def kwargs_only(**kwargs):  # type: ignore[no-untyped-def]
    yield 1


def varargs_only(*last):  # type: ignore[no-untyped-def]
    yield 1


class Callable_:
    def __call__(self, last=None):  # type: ignore[no-untyped-def]
        yield last


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (with_last, True),
        (with_last_and_kwargs, True),
        (keyword_only_last, True),
        (Callable_(), True),
        (no_last, False),
        (kwargs_only, False),
        (positional_only_last, False),  # get_jobs(last=…) would raise TypeError
        (varargs_only, False),
        (len, False),  # builtins may have no inspectable signature
    ],
)
def test_accepts_last(func: Callable[..., object], expected: bool) -> None:
    assert accepts_last(func) is expected


def _plain() -> Iterator[int]:
    yield 1


def _named(path: str, n: str = "3", last: int | None = None) -> Iterator[int]:
    yield 1


def _keyword_only(*, path: str, last: int | None = None) -> Iterator[int]:
    yield 1


def _anything(**kwargs: str) -> Iterator[int]:
    yield 1


def test_key_value_arguments_get_jobs_cannot_take_are_refused_in_one_line() -> None:
    check_kwargs(_named, {"path": "x"})
    check_kwargs(_named, {"path": "x", "n": "5"})
    check_kwargs(_keyword_only, {"path": "x"})
    check_kwargs(_anything, {"whatever": "1"})
    check_kwargs(_plain, {})
    check_kwargs(print, {"anything": "1"})  # not a Python function: left to fail when called
    refusals = [
        (_plain, {"foo": "1"}, "test_targets.py: _plain() takes no argument foo= (it takes none)"),
        (_named, {"path": "x", "m": "1"}, "_named() takes no argument m= (it takes path=, n=)"),
        (_named, {"n": "1"}, "test_targets.py: _named() needs path=…"),
        (_keyword_only, {}, "_keyword_only() needs path=…"),
    ]
    for func, kwargs, says in refusals:
        with pytest.raises(TargetError, match=re.escape(says)) as refused:
            check_kwargs(func, kwargs)
        assert "\n" not in str(refused.value) and isinstance(refused.value, UsageError)
