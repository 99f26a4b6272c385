"""What the CPU and CUDA extension loaders share (fastmlstm/ops/_extension.py): the compiler-error
excerpt, the ahead-of-time library lookup, and what a build says before it waits or compiles."""

from __future__ import annotations

import importlib.machinery
import logging

import pytest
from torch.utils import cpp_extension

from fastmlstm.ops import _extension


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


@pytest.mark.parametrize("locked", [False, True])
def test_a_build_waiting_on_another_process_says_so_first(monkeypatch, tmp_path, caplog, locked):
    """torch's build lock makes a second process wait without a word (a generate or featurize call
    was seen silent for 35-100 s while another process built the CPU extension)."""
    build_dir = tmp_path / "build"
    if locked:
        build_dir.mkdir()
        (build_dir / "lock").write_text("")
    said_before_load = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: said_before_load.extend(
        r.getMessage() for r in caplog.records) or str(build_dir / "lib.so"))
    with caplog.at_level(logging.INFO, logger="fastmlstm"):
        path = _extension.build_with_torch("lib", [], build_dir, announce="compiling lib",
                                           failure=lambda exc, where: "no")
    assert path == str(build_dir / "lib.so")
    waiting = [m for m in said_before_load if "another process is building the lib library" in m]
    assert said_before_load[0] == "compiling lib" and len(waiting) == int(locked)


def test_a_failed_build_raises_the_reason_and_logs_the_whole_output(monkeypatch, tmp_path, caplog):
    def fail(**kwargs):
        raise RuntimeError("a.cpp:1: error: broken\nmore output")

    monkeypatch.setattr(cpp_extension, "load", fail)
    with caplog.at_level(logging.INFO, logger="fastmlstm"), pytest.raises(
            _extension.ExtensionUnavailable, match=r"^reason: a.cpp:1: error: broken; fix it in .*build$"):
        _extension.build_with_torch("lib", [], tmp_path / "build", announce=None,
                                    failure=lambda exc, where: f"reason: {_extension.compiler_errors(exc)}; fix it in {where}")
    assert "more output" in caplog.records[-1].getMessage()
