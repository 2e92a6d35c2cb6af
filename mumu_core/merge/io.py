"""Streaming tensor reads and atomic writes for the merge engine: one tensor at a time, never the whole model.

Why not `safetensors.safe_open`: it memory-maps the file, and every page it touches counts in the
process RSS (a 6.9 GB checkpoint reads as ~7 GB RSS). Headers are parsed by `safetensors_io`;
tensors to change are read with `os.pread` into reusable buffers, untouched ones are copied
inside the kernel (`copy_file_range`), and the page cache of ranges already read/written is
dropped with `posix_fadvise(DONTNEED)` so a merge does not evict the rest of the machine's cache.

The writer lays out the header first (every output size is known before any data is written),
streams tensors into a temporary file in the destination folder, fsyncs, and renames it into place:
a crash or kill leaves either the old state or the complete new file, never a partial one.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..atomic import fsync_dir
from ..errors import MumuError
from ..safetensors_io import DTYPES, SafetensorsHeader, TensorEntry, build_header_bytes

COPY_CHUNK = 64 * 1024 * 1024  # pass-through tensors move in chunks of at most this

_FADVISE = hasattr(os, "posix_fadvise")


class StreamReader:
    """Random-access tensor reads by `os.pread` into a reusable buffer (dropped from the page cache).

    The main pass over the finetune uses `Prefetcher`; this serves the add-difference inputs,
    which are read in the finetune's order rather than their own.
    """

    def __init__(self, header: SafetensorsHeader):
        self.header = header
        self.fd = os.open(header.path, os.O_RDONLY)
        self._buf = bytearray(0)
        if _FADVISE:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _pread_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise MumuError(f"{self.header.path} ended early while reading (file truncated or changed during "
                                f"the merge).")
            done += n
        if _FADVISE:
            os.posix_fadvise(self.fd, offset, len(view), os.POSIX_FADV_DONTNEED)

    def read_bytes(self, entry: TensorEntry) -> memoryview:
        """The tensor's raw bytes in the shared buffer (valid until the next read)."""
        if len(self._buf) < entry.nbytes:
            self._buf = bytearray(entry.nbytes)
        view = memoryview(self._buf)[: entry.nbytes]
        self._pread_into(view, entry.start)
        return view

    def read_tensor(self, entry: TensorEntry, copy: bool = False):
        """A torch tensor over the shared buffer (`copy=True` for one that outlives the next read)."""
        return self.read_with_bytes(entry, copy)[0]

    def read_with_bytes(self, entry: TensorEntry, copy: bool = False):
        """(tensor, raw bytes) sharing the buffer: writing into the tensor changes the bytes."""
        import torch

        raw = self.read_bytes(entry)
        dtype = getattr(torch, DTYPES[entry.dtype][0])
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=dtype), raw
        t = torch.frombuffer(raw, dtype=dtype).view(entry.shape)
        return (t.clone() if copy else t), raw


@dataclass(frozen=True)
class Piece:
    """A byte range to read: `tag` is the caller's (e.g. which tensor, whether to merge it)."""

    tag: object
    fd: int
    start: int
    length: int
    read: bool = True  # False: the caller copies it inside the kernel; nothing to read or hash here


class Prefetcher:
    """Reads pieces one ahead on a helper thread into two alternating buffers; hashes on a second one.

    While the caller computes on / writes piece i, piece i+1 is read and (with `hasher`) piece i
    is hashed: reads, writes and sha256 all release the GIL, so they overlap. The caller must call
    `wait_hash()` before modifying a piece's bytes in place. With a hasher, pieces must cover one
    file front to back in offset order; gaps between them are hashed too, and `finish()` hashes
    the file's tail.
    """

    def __init__(self, pieces: list[Piece], buf_size: int, hasher=None, hash_file_size: int = 0):
        from concurrent.futures import ThreadPoolExecutor

        self.pieces = pieces
        self._bufs = [bytearray(buf_size), bytearray(buf_size)] if pieces else []
        self._hasher = hasher
        self._hashed_to = 0
        self._hash_fd = pieces[0].fd if pieces else -1
        self._hash_file_size = hash_file_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mumu-merge-read")
        self._hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mumu-merge-hash") if hasher else None
        self._hash_future = None

    def _pread(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise MumuError("the checkpoint ended early while reading (file truncated or changed during "
                                "the merge).")
            done += n

    def _load(self, piece: Piece, buf: bytearray) -> memoryview | None:
        if not piece.read:
            return None
        view = memoryview(buf)[: piece.length]
        self._pread(piece.fd, view, piece.start)
        if _FADVISE:
            os.posix_fadvise(piece.fd, piece.start, piece.length, os.POSIX_FADV_DONTNEED)
        return view

    def _hash(self, piece: Piece, view: memoryview) -> None:
        if piece.start > self._hashed_to:  # a gap (the header, or padding between tensors)
            self._hasher.update(os.pread(piece.fd, piece.start - self._hashed_to, self._hashed_to))
        self._hasher.update(view)
        self._hashed_to = piece.start + piece.length

    def wait_hash(self) -> None:
        """Block until the current piece is hashed (before changing its bytes in place)."""
        if self._hash_future is not None:
            self._hash_future.result()
            self._hash_future = None

    def __iter__(self):
        if not self.pieces:
            return
        fut = self._pool.submit(self._load, self.pieces[0], self._bufs[0])
        for i, piece in enumerate(self.pieces):
            view = fut.result()
            self.wait_hash()  # piece i-1's buffer is about to be reused for piece i+1
            if self._hash_pool is not None and view is not None:
                self._hash_future = self._hash_pool.submit(self._hash, piece, view)
            if i + 1 < len(self.pieces):
                # the other buffer held piece i-1, which the caller has written and the hasher read
                fut = self._pool.submit(self._load, self.pieces[i + 1], self._bufs[(i + 1) % 2])
            yield piece, view

    def finish(self) -> str | None:
        """Hash the file's tail; return the hex digest (None without a hasher)."""
        self.wait_hash()
        self._pool.shutdown(wait=True)
        if self._hasher is None:
            return None
        if self._hash_file_size > self._hashed_to:
            self._hasher.update(os.pread(self._hash_fd, self._hash_file_size - self._hashed_to, self._hashed_to))
            self._hashed_to = self._hash_file_size
        return self._hasher.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True, cancel_futures=True)


class AtomicSafetensorsWriter:
    """Writes a safetensors file to `<dest dir>/.<name>.partial-<pid>` and renames it when complete."""

    def __init__(self, out_path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str], reserve: int = 0):
        # `reserve` spare header bytes let commit() rewrite the metadata with figures known only
        # at the end (input hash, precision), without a second pass over the data.
        self.out_path = Path(out_path)
        self.tmp_path = self.out_path.parent / f".{self.out_path.name}.partial-{os.getpid()}"
        self._order = [e[0] for e in entries]
        self._sizes = {}
        for name, dtype, shape in entries:
            n = DTYPES[dtype][1]
            for d in shape:
                n *= d
            self._sizes[name] = n
        self._entries = list(entries)
        probe = build_header_bytes(entries, metadata)
        self._header_size = len(probe) - 8 + reserve
        header = build_header_bytes(entries, metadata, size=self._header_size)
        self.total_bytes = len(header) + sum(self._sizes.values())
        self.fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._next = 0
        self._written_in_tensor = 0
        self._pos = 0
        self._write(header)

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.write(self.fd, view)
            view = view[n:]
            self._pos += n

    def _expect(self, name: str) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise RuntimeError(f"writer expected tensor {self._order[self._next:self._next + 1]}, got {name!r}")

    def write(self, name: str, data) -> None:
        """Append (part of) tensor `name`'s bytes; tensors must come in the header's order."""
        self._expect(name)
        n = memoryview(data).nbytes
        self._write(data)
        self._advance(name, n)

    def copy_from(self, name: str, src_fd: int, offset: int, length: int) -> None:
        """Append `length` bytes of `src_fd` at `offset` to tensor `name`, copied inside the kernel.

        Untouched tensors (CLIP, VAE, most of the UNet) never pass through user space, like
        `shutil.copyfile`; where the kernel cannot (other filesystem, old kernel) it falls back to
        pread + write.
        """
        self._expect(name)
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(src_fd, self.fd, length - done, offset + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                n = 0
            if n <= 0:  # unsupported here, or EOF: move the rest through user space
                data = os.pread(src_fd, length - done, offset + done)
                if not data:
                    raise MumuError("the checkpoint ended early while reading (file truncated or changed during "
                                    "the merge).")
                self._write(data)
                n = len(data)
            else:
                self._pos += n
            done += n
        if _FADVISE:
            os.posix_fadvise(src_fd, offset, length, os.POSIX_FADV_DONTNEED)
        self._advance(name, length)

    def _advance(self, name: str, n: int) -> None:
        self._written_in_tensor += n
        size = self._sizes[name]
        if self._written_in_tensor > size:
            raise RuntimeError(f"tensor {name!r}: {self._written_in_tensor} bytes written, {size} expected")
        if self._written_in_tensor == size:
            self._next += 1
            self._written_in_tensor = 0
            hook = os.environ.get("MUMU_MERGE_TEST_SLOW_WRITE")
            if hook:  # tests: slow the write down so a SIGKILL lands mid-file
                import time

                time.sleep(float(hook))

    def commit(self, final_metadata: dict[str, str] | None = None) -> Path:
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if final_metadata is not None:
            header = build_header_bytes(self._entries, final_metadata, size=self._header_size)
            os.pwrite(self.fd, header, 0)
        os.fsync(self.fd)
        if _FADVISE:  # clean pages now: drop them so the merge leaves the page cache as it found it
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp_path, self.out_path)
        fsync_dir(self.out_path.parent)
        return self.out_path

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike], overwrite: bool = False) -> Path:
    """Refuse to write over an input (also through links) or over an existing file unless asked."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise MumuError(f"output {out} must end in .safetensors (the merge writes safetensors only).")
    if not out.parent.is_dir():
        raise MumuError(f"output folder {out.parent} does not exist; create it first.")
    for src in inputs:
        src = Path(src)
        same = out.resolve() == src.resolve()
        if not same and out.exists() and src.exists():
            same = os.path.samefile(out, src)
        if same:
            raise MumuError(f"output {out} is the input {src}; the merge never overwrites its inputs. "
                            f"Choose a new output name.")
    if out.exists() and not overwrite:
        raise MumuError(f"output {out} already exists; pass --overwrite (or choose another name) to replace it.")
    return out


def check_free_space(folder: str | os.PathLike, needed: int, margin: int = 64 * 1024 * 1024) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + margin:
        raise MumuError(f"not enough free disk space in {folder}: the merged file needs {needed / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB are free. Free some space or write elsewhere.")


def remove_stale_partials(out_path: str | os.PathLike) -> list[Path]:
    """Delete `.NAME.partial-PID` leftovers of merges that were killed (their PID is gone)."""
    out_path = Path(out_path)
    removed = []
    for p in out_path.parent.glob(f".{out_path.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            continue  # still running (or not ours to judge)
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
