"""What the CPU and CUDA extension loaders share (fastmlstm/ops/_extension.py): the compiler-error
excerpt, the ahead-of-time library lookup, and what a build says before it waits or compiles."""

from __future__ import annotations

import importlib.machinery
import logging
import threading

import pytest
from torch.utils import cpp_extension

from fastmlstm.ops import _extension

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def test_the_excerpt_keeps_the_diagnostics_not_the_command_lines():
    output = ("[1/2] c++ -c a.cpp -o a.o -O3\nFAILED: a.o\na.cpp:3:1: error: 'x' was not declared\n"
              "Error building extension 'lib'\n/usr/include/b.h:1: error: from a system header")
    error = RuntimeError(output)
    assert _extension.compiler_errors(error).splitlines() == [
        "a.cpp:3:1: error: 'x' was not declared", "/usr/include/b.h:1: error: from a system header"]
    skip_system = _extension.compiler_errors(error, skip=lambda line: line.startswith("/usr"))
    assert skip_system == "a.cpp:3:1: error: 'x' was not declared"
    # no diagnostic at all: the output's last lines, else the exception's type
    assert _extension.compiler_errors(RuntimeError("ninja: build stopped")) == "ninja: build stopped"
    assert _extension.compiler_errors(RuntimeError("")) == "RuntimeError"


def test_the_ahead_of_time_library_is_found_by_any_extension_suffix(tmp_path):
    assert _extension.aot_library(tmp_path, "_C") is None
    library = tmp_path / f"_C{importlib.machinery.EXTENSION_SUFFIXES[-1]}"
    library.write_bytes(b"")
    assert _extension.aot_library(tmp_path, "_C") == library


def _fake_load(monkeypatch, caplog, build_dir, seen):
    """cpp_extension.load replaced: it records what was logged before it and whether torch's lock
    was there when it ran."""
    def load(**kwargs):
        seen.append(([r.getMessage() for r in caplog.records], (build_dir / "lock").exists()))
        return str(build_dir / "lib.so")

    monkeypatch.setattr(cpp_extension, "load", load)


@pytest.mark.skipif(fcntl is None, reason="no flock on this platform")
def test_a_lock_left_by_a_killed_build_is_cleared_not_waited_on_forever(monkeypatch, tmp_path, caplog):
    """torch's build lock stays behind when the building process is killed, and every later load
    waited for it forever; with no live build holding the guard, it is a leftover and goes."""
    build_dir, seen = tmp_path / "build", []
    build_dir.mkdir()
    (build_dir / "lock").write_text("")
    _fake_load(monkeypatch, caplog, build_dir, seen)
    with caplog.at_level(logging.INFO, logger="fastmlstm"):
        path = _extension.build_with_torch("lib", [], build_dir, announce=lambda: "compiling lib",
                                           failure=lambda exc, where: "no")
    assert path == str(build_dir / "lib.so")
    [(said, lock_there)] = seen
    assert not lock_there and any("left by a build that was killed" in m for m in said)
    assert said[-1] == "compiling lib"


@pytest.mark.skipif(fcntl is None, reason="no flock on this platform")
def test_a_build_waiting_on_another_process_says_so_first(monkeypatch, tmp_path, caplog):
    """A live build elsewhere holds the guard: this one says it waits (torch's lock made a generate
    or featurize call wait 35-100 s without a word), then builds once the other is done."""
    build_dir, seen = tmp_path / "build", []
    build_dir.mkdir()
    _fake_load(monkeypatch, caplog, build_dir, seen)
    with open(build_dir / "fastmlstm.build-lock", "a") as other:  # another open file: flock sees another holder
        fcntl.flock(other, fcntl.LOCK_EX)
        releaser = threading.Timer(0.3, lambda: fcntl.flock(other, fcntl.LOCK_UN))
        releaser.start()
        with caplog.at_level(logging.INFO, logger="fastmlstm"):
            _extension.build_with_torch("lib", [], build_dir, announce=lambda: None, failure=lambda exc, where: "no")
        releaser.join()
    [(said, _)] = seen
    assert any("another process is building the lib library" in m for m in said), said


def test_a_failed_build_raises_the_reason_and_logs_the_whole_output(monkeypatch, tmp_path, caplog):
    def fail(**kwargs):
        raise RuntimeError("a.cpp:1: error: broken\nmore output")

    monkeypatch.setattr(cpp_extension, "load", fail)
    with caplog.at_level(logging.INFO, logger="fastmlstm"), pytest.raises(
            _extension.ExtensionUnavailable, match=r"^reason: a.cpp:1: error: broken; fix it in .*build$"):
        _extension.build_with_torch("lib", [], tmp_path / "build", announce=lambda: None,
                                    failure=lambda exc, where: f"reason: {_extension.compiler_errors(exc)}; fix it in {where}")
    assert "more output" in caplog.records[-1].getMessage()
