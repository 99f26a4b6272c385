"""Every model writer under injected faults: a failure at any file-system step (tests/faults.py)
leaves the previous model loadable and its files byte-identical; a completed write gives the new
one. Writers: save_pretrained (into a user's folder, and a new one), ByteLM.save (.pt),
save_openai, training checkpoints, download_model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from faults import fresh_copy, hunt, snapshot
from test_model_download import NAME, same_weights, server, standins  # noqa: F401 (fixtures)

import fastmlstm
from fastmlstm._atomic import TXN_DIR, committed_path
from fastmlstm.models.pretrained import MARKER, download_model
from fastmlstm.models.serialization import WEIGHTS_FILE


def model(seed: int) -> fastmlstm.ByteLM:
    torch.manual_seed(seed)
    return fastmlstm.ByteLM(hidden_size=8, embed_size=4)


OLD, NEW = model(1), model(2)


def previous_model_folder(load):
    """A ``previous_ok`` for a folder: byte-identical to the template (which loads as the old model)."""
    checked = []

    def check(state: Path, error) -> None:
        assert snapshot(state) == snapshot(state.parent / "template"), error
        if not checked:
            assert same_weights(load(state.parent / "template" / "m"), OLD)
            checked.append(True)
    return check


def test_save_pretrained_into_a_users_folder(tmp_path):
    template = tmp_path / "template"
    OLD.save_pretrained(template / "m")
    (template / "m" / "README.md").write_text("the user's notes")

    def new_ok(state: Path) -> None:
        assert same_weights(fastmlstm.from_pretrained(state / "m"), NEW)
        assert (state / "m" / "README.md").read_text() == "the user's notes"
        names = {p.name for p in (state / "m").iterdir()}
        assert names <= {"config.json", "model.safetensors", "README.md", TXN_DIR}, names

    steps = hunt(lambda: fresh_copy(template, tmp_path / "work"), lambda s: NEW.save_pretrained(s / "m"),
                 previous_model_folder(fastmlstm.from_pretrained), new_ok)
    assert steps >= 8  # the staged writes, their fsyncs, the journal, four renames, the commit


def test_save_pretrained_into_a_new_folder_appears_whole_or_not_at_all(tmp_path):
    (tmp_path / "template").mkdir()

    def previous_ok(state: Path, error) -> None:
        assert snapshot(state) == {}, (error, snapshot(state))  # no half folder, no staging left beside it

    hunt(lambda: fresh_copy(tmp_path / "template", tmp_path / "work"),
         lambda s: NEW.save_pretrained(s / "new" / "m"), previous_ok,
         lambda s: same_weights(fastmlstm.from_pretrained(s / "new" / "m"), NEW) or pytest.fail("new model"))


def test_save_pretrained_when_the_disk_fails_for_good(tmp_path):
    """Every step from the k-th on fails (undoing fails too): the old model still loads, through the
    journal where files were moved aside, and the next save tidies the folder."""
    template = tmp_path / "template"
    OLD.save_pretrained(template / "m")
    journals = []

    def previous_ok(state: Path, error) -> None:
        assert same_weights(fastmlstm.from_pretrained(state / "m"), OLD), error
        if (state / "m" / TXN_DIR / "journal.json").exists():
            journals.append(committed_path(state / "m", "model.safetensors"))
        NEW.save_pretrained(state / "m")  # the disk is back
        assert same_weights(fastmlstm.from_pretrained(state / "m"), NEW)
        assert {p.name for p in (state / "m").iterdir()} == {"config.json", "model.safetensors"}

    hunt(lambda: fresh_copy(template, tmp_path / "work"), lambda s: NEW.save_pretrained(s / "m"), previous_ok,
         lambda s: None, lasting=True)
    assert any(TXN_DIR in str(p) for p in journals)  # some runs did leave a journal for the reader


def test_model_file_save(tmp_path):
    template = tmp_path / "template"
    template.mkdir()
    OLD.save(template / "m")
    hunt(lambda: fresh_copy(template, tmp_path / "work"), lambda s: NEW.save(s / "m"),
         previous_model_folder(fastmlstm.load),
         lambda s: same_weights(fastmlstm.load(s / "m"), NEW) or pytest.fail("new model"))


def test_save_openai(tmp_path):
    template = tmp_path / "template"
    fastmlstm.save_openai(OLD, template / "m")
    (template / "m" / "notes.txt").write_text("kept")

    def new_ok(state: Path) -> None:
        assert same_weights(fastmlstm.load_openai(state / "m"), NEW)
        assert (state / "m" / "notes.txt").read_text() == "kept"

    steps = hunt(lambda: fresh_copy(template, tmp_path / "work"), lambda s: fastmlstm.save_openai(NEW, s / "m"),
                 previous_model_folder(fastmlstm.load_openai), new_ok)
    assert steps >= 15 * 3


def test_training_checkpoints(tmp_path):
    from fastmlstm.training.checkpoints import find_latest_checkpoint, save_checkpoint
    from fastmlstm.training.distributed import Context
    from fastmlstm.training.metrics import LogWindow
    from fastmlstm.training.state import TrainState

    ctx = Context(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    net = model(3)
    h, c = torch.zeros(2, 8), torch.zeros(2, 8)

    def state(step: int) -> TrainState:
        return TrainState(net, torch.optim.Adam(net.parameters()), h, c, step)

    template = tmp_path / "template"
    template.mkdir()
    for step in (2, 4):
        save_checkpoint(ctx, template, state(step), LogWindow(ctx.device), {"run": 1}, 0, keep=2)
    old = snapshot(template)

    def previous_ok(out: Path, error) -> None:
        # every earlier checkpoint is intact, unless the new one is complete and it was the one to prune
        latest, unreadable = find_latest_checkpoint(out)
        assert not unreadable and latest is not None and latest["step"] in (4, 6), error
        now = snapshot(out)
        assert all(now.get(name) == digest for name, digest in old.items()
                   if not (latest["step"] == 6 and name == "ckpt-00000002.pt")), error
        assert set(now) <= set(old) | {"ckpt-00000006.pt"}, (error, now)  # no temporary file left

    def new_ok(out: Path) -> None:
        assert sorted(snapshot(out)) == ["ckpt-00000004.pt", "ckpt-00000006.pt"]
        assert find_latest_checkpoint(out)[0]["step"] == 6

    hunt(lambda: fresh_copy(template, tmp_path / "work"),
         lambda out: save_checkpoint(ctx, out, state(6), LogWindow(ctx.device), {"run": 1}, 0, keep=2),
         previous_ok, new_ok)


def test_download_model_again(server, standins, tmp_path):  # noqa: F811
    """force=True over a verified folder: the files that were there stay byte-identical whatever
    fails (only the marker, a record, goes first), and the next call completes the folder."""
    _, table = standins
    template = tmp_path / "template"
    download_model(NAME, root=template, mirror=server.url, checksums=table, progress=False)
    old = {k: v for k, v in snapshot(template).items() if k.endswith(".npy")}
    reference = fastmlstm.load_openai(template / NAME)

    def previous_ok(root: Path, error) -> None:
        now = snapshot(root)
        assert {k: v for k, v in now.items() if k.endswith(".npy")} == old, error
        assert set(now) <= set(old) | {NAME, f".{NAME}.lock", f"{NAME}/{MARKER}"} | {
            f"{k}.part" for k in old}, (error, set(now) - set(old))
        download_model(NAME, root=root, mirror=server.url, checksums=table, progress=False, recheck=False)
        assert (root / NAME / MARKER).is_file()

    hunt(lambda: fresh_copy(template, tmp_path / "work"),
         lambda root: download_model(NAME, root=root, mirror=server.url, checksums=table, progress=False,
                                     force=True),
         previous_ok, lambda root: same_weights(fastmlstm.load_openai(root / NAME), reference) or pytest.fail())


def test_a_new_folder_that_appears_while_it_is_written(tmp_path):
    """Another writer creates the folder first: the set then replaces its files like any folder's,
    leaving the others, and nothing is left beside it."""
    from fastmlstm._atomic import FileSet

    target = tmp_path / "m"
    with FileSet(target) as files:
        files.write("a.bin", b"new")
        target.mkdir()
        (target / "a.bin").write_bytes(b"old")
        (target / "theirs.txt").write_bytes(b"kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (target / "a.bin").read_bytes() == b"new" and (target / "theirs.txt").read_bytes() == b"kept"
    assert sorted(p.name for p in target.iterdir()) == ["a.bin", "theirs.txt"]


def test_a_users_folder_where_a_file_of_the_set_goes_is_refused_not_deleted(tmp_path):
    """The swap moves what a set's name replaces aside and deletes it once committed: a folder of
    that name (a user's folder called corpus.bin or model.safetensors) went with its contents."""
    from fastmlstm._atomic import FileSet
    from fastmlstm.errors import InputError

    target = tmp_path / "m"
    (target / "a.bin").mkdir(parents=True)
    (target / "a.bin" / "notes.txt").write_text("the user's")
    (target / "b.bin").write_bytes(b"old")
    with pytest.raises(InputError, match=r"a.bin: a folder of that name is in the way"), FileSet(target) as files:
        files.write("b.bin", b"new")
        files.write("a.bin", b"new")
    assert (target / "a.bin" / "notes.txt").read_text() == "the user's" and (target / "b.bin").read_bytes() == b"old"
    assert sorted(p.name for p in target.iterdir()) == ["a.bin", "b.bin"]


class _FullDisk:
    """A file on a disk with ``room`` bytes left: a longer write raises ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def _saved_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in folder.iterdir()}


@pytest.mark.parametrize("room", [0, 600])
def test_a_full_disk_is_one_error_naming_the_file_and_the_model_is_kept(tmp_path, monkeypatch, room):
    # torch.save reports a failed write as its own RuntimeError ("[enforce fail at
    # inline_container.cc] unexpected pos 704 vs 598"), which said neither the file nor why.
    import errno
    import os

    import fastmlstm._atomic as atomic
    from fastmlstm._atomic import UnwritableError

    OLD.save(tmp_path / "m.pt")
    OLD.save_pretrained(tmp_path / "m")
    before = _saved_files(tmp_path), _saved_files(tmp_path / "m")
    fdopen, real_open = os.fdopen, open
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FullDisk(fdopen(*a, **k), room))
    monkeypatch.setattr(atomic, "open", lambda file, mode="r", *a, **k: _FullDisk(real_open(file, mode, *a, **k), room)
                        if "w" in mode else real_open(file, mode, *a, **k), raising=False)
    # (a model folder's error names the file of the set that did not fit)
    for save, name in ((lambda: NEW.save(tmp_path / "m.pt"), "m.pt"),
                       (lambda: NEW.save_pretrained(tmp_path / "m"), f"m/{WEIGHTS_FILE}"),
                       (lambda: fastmlstm.save(NEW, tmp_path / "new.pt"), "new.pt")):
        with pytest.raises(UnwritableError, match=rf"cannot write {tmp_path / name}: No space left on device") as info:
            save()
        assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert (_saved_files(tmp_path), _saved_files(tmp_path / "m")) == before
    assert same_weights(fastmlstm.load(tmp_path / "m.pt"), OLD)
    assert same_weights(fastmlstm.from_pretrained(tmp_path / "m"), OLD)


def test_a_read_only_file_system_names_the_model_file_not_a_temporary_one(tmp_path, monkeypatch):
    # It was an OSError traceback naming the temporary file beside it (.m.pt.wfs7afrs.tmp).
    import errno

    import fastmlstm._atomic as atomic
    from fastmlstm._atomic import UnwritableError

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".m.pt.x.tmp"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(UnwritableError, match=rf"cannot write {tmp_path / 'm.pt'}: Read-only file system"):
        OLD.save(tmp_path / "m.pt")


def test_a_dangling_link_where_the_folder_goes_is_refused(tmp_path):
    # It was a NotADirectoryError traceback from renaming the staged folder onto the link.
    from fastmlstm.errors import InputError

    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(InputError, match=r"link: it is a symbolic link to .*gone, which does not exist"):
        OLD.save_pretrained(tmp_path / "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_a_file_set_that_runs_out_of_room_names_its_file(tmp_path):
    """Every FileSet user (a model folder, the released layout's export, the corpus stream, a
    dataset's folder) got a bare OSError without a path from a write past the room left."""
    import errno
    import resource
    import signal

    from fastmlstm._atomic import FileSet, UnwritableError

    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "a.bin").write_bytes(b"old")
    previous_signal = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, previous[1]))  # writes past 4 KiB of a file fail: EFBIG
    try:
        with pytest.raises(UnwritableError, match=rf"cannot write {tmp_path / 'set' / 'a.bin'}: File too large "
                                                  r"\(what was there is unchanged\)$") as info, \
                FileSet(tmp_path / "set") as files, files.open("a.bin") as f:
            for _ in range(4):
                f.write(bytes(2048))
                f.flush()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_signal)
    assert info.value.errno == errno.EFBIG and (tmp_path / "set" / "a.bin").read_bytes() == b"old"
    # an error of the caller's own (a read of its source) passes as it was
    with pytest.raises(FileNotFoundError), FileSet(tmp_path / "set") as files, files.open("b.bin"):
        (tmp_path / "missing").read_bytes()

