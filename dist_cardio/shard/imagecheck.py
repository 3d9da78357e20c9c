"""Image validation before bytes enter a shard.

DALI's decoder kills the whole pipeline on one bad image and names no file, and PIL alone misses some
damage (a PNG with a broken CRC loads; a truncated JPEG passes ``verify()``). So every image is checked
here in the order of cost: µs-cheap structure checks (JPEG SOI/SOS/EOI markers, a header that claims
more pixels than the data can hold, PNG signature, chunk CRCs, IEND), then a decode. JPEGs are decoded
by libjpeg-turbo (simplejpeg) at 1/8 scale, which still entropy-decodes the whole stream, with every
libjpeg warning an error: Pillow silences those warnings and pads a stream cut short or damaged
mid-scan with grey, while DALI prints them ("Corrupt JPEG data: premature end of data segment") and
trains on the grey. Other formats are decoded by Pillow.

``ImagePool`` runs these checks in worker processes for ``shard`` and ``verify``, results in input order.
"""

from __future__ import annotations

import gc
import io
import multiprocessing
import os
import sys
import threading
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image
from tqdm import tqdm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Formats Pillow may open here (its JPEG opener also returns multi-picture "MPO" files). Restricting
# them keeps plugins that shell out (EPS → ghostscript) or parse exotic containers away from untrusted bytes.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP")
# Above this many pixels an image is refused: a 600-dpi A4 scan has ~35 M; a tiny PNG claiming
# 100k × 100k pixels is a decompression bomb.
MAX_PIXELS = 150_000_000
# Huffman-coded frames (baseline, extended, progressive, lossless): every 8x8 block costs at least one bit.
_HUFFMAN_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7})
_JPEG_OUTPUT = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}  # libjpeg colour space → simplejpeg output


class BadImage(ValueError):
    """An image that must not go into a shard; ``str(e)`` is the reason, ``kind: detail``."""


@dataclass(frozen=True)
class ImageInfo:
    """What the checks learnt: Pillow's format name and (width, height)."""

    format: str
    size: tuple[int, int]

    @property
    def family(self) -> str | None:
        """``jpg`` or ``png`` when the bytes can go into a shard unchanged, else None (convert)."""
        if self.format in ("JPEG", "MPO"):
            return "jpg"
        if self.format == "PNG":
            return "png"
        return None


def check_structure(data: bytes) -> None:
    """Cheap container checks (no pixel decoding); raises BadImage."""
    if not data:
        raise BadImage("empty file: 0 bytes")
    if data.startswith(b"\xff\xd8"):
        _check_jpeg(data)
    elif data.startswith(PNG_SIGNATURE):
        _check_png(data)


def _check_jpeg(data: bytes) -> None:
    n = len(data)
    i = 2
    frame: tuple[int, int] | None = None  # (width, height) from a Huffman frame header
    while True:
        i = data.find(b"\xff", i)  # libjpeg also skips stray bytes between segments
        if i < 0 or i + 4 > n:
            raise BadImage("truncated JPEG: ends before the start of scan")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:
            raise BadImage("corrupt JPEG: end-of-image marker before any image data")
        if 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01):
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            raise BadImage(f"corrupt JPEG: segment length {length} at byte {i}")
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            scan_start = i + 2 + length
            break
        if marker in _HUFFMAN_SOF and i + 9 <= n:
            frame = int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        i += 2 + length
    # In entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so FFD9 after the first
    # scan can only be the real end-of-image marker; trailing bytes after it are tolerated.
    if scan_start >= n or data.rfind(b"\xff\xd9") < scan_start:
        raise BadImage("truncated JPEG: no end-of-image marker")
    if frame is not None:
        w, h = frame
        least = -(-w // 8) * -(-h // 8) // 8  # bytes of entropy data at one bit per luminance block
        if least > n - scan_start:
            raise BadImage(f"corrupt JPEG: header claims {w}x{h} pixels, more than its "
                           f"{n - scan_start} bytes of image data can hold")


def _check_png(data: bytes) -> None:
    view = memoryview(data)
    n = len(data)
    pos = len(PNG_SIGNATURE)
    first = True
    while pos + 12 <= n:
        length = int.from_bytes(view[pos : pos + 4], "big")
        ctype = bytes(view[pos + 4 : pos + 8])
        end = pos + 12 + length
        if not ctype.isalpha():
            raise BadImage(f"corrupt PNG: invalid chunk type at byte {pos}")
        name = ctype.decode("ascii")
        if first and ctype != b"IHDR":
            raise BadImage(f"corrupt PNG: first chunk is {name}, not IHDR")
        first = False
        if end > n:
            raise BadImage(f"truncated PNG: {name} chunk at byte {pos} runs past the end")
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            raise BadImage(f"corrupt PNG: bad CRC in {name} chunk at byte {pos}")
        if ctype == b"IEND":
            return
        pos = end
    raise BadImage("truncated PNG: no IEND chunk")


def open_image(data: bytes) -> Image.Image:
    """Pillow image over ``data`` limited to ALLOWED_FORMATS; raises BadImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise BadImage(f"image too large: {e}") from None
    except Exception as e:  # Pillow raises many types for unreadable headers
        raise BadImage(f"not an image: {_pil_message(e)}") from None
    w, h = image.size
    if w <= 0 or h <= 0:
        raise BadImage(f"corrupt image: size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise BadImage(f"image too large: {w}x{h} pixels > {MAX_PIXELS} limit")
    return image


def inspect_image(data: bytes, decode: bool = True) -> ImageInfo:
    """Validate ``data`` (structure, then a decode when ``decode``: strict libjpeg-turbo for JPEG, Pillow
    for the rest) and describe it; raises BadImage."""
    check_structure(data)
    image = open_image(data)
    info = ImageInfo(image.format, image.size)
    if decode and info.family == "jpg":
        verify_jpeg(data)
    elif decode:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image.load()
        except Exception as e:
            raise BadImage(f"undecodable {info.format}: {_pil_message(e)}") from None
    return info


def verify_jpeg(data: bytes) -> None:
    """Entropy-decode all of ``data`` at 1/8 scale; BadImage on any libjpeg error or warning."""
    import simplejpeg  # imported here: shard workers that never see a JPEG do not load it

    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace=_JPEG_OUTPUT.get(colorspace, "RGB"), min_height=1, min_width=1,
                               min_factor=8, fastdct=True, fastupsample=True, strict=True)
    except ValueError as e:
        raise BadImage(f"undecodable JPEG: {e}") from None


def check_image_bytes(data: bytes, name: str, decode: bool = True) -> str | None:
    """None when ``data`` is a valid image DALI and Pillow will decode, else the reason.

    ``name`` (file or member name) only words the reason for non-images; the content decides the
    format, so a PNG named ``.jpg`` passes.
    """
    try:
        inspect_image(data, decode=decode)
    except BadImage as e:
        reason = str(e)
        return f"{reason} ({name})" if reason.startswith("not an image") else reason
    return None


def _pil_message(e: Exception) -> str:
    # Pillow's messages name the BytesIO object; keep only the useful part.
    msg = str(e).split(" <_io.BytesIO")[0].strip()
    return msg or type(e).__name__


# --- the checks in worker processes ------------------------------------------------------------------
Tag = TypeVar("Tag")
Arg = TypeVar("Arg")
Result = TypeVar("Result")
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: enough to ride out a slow write in the parent, memory bounded


def worker_count(workers: int) -> int:
    """``workers``, or for 0 one per CPU core this process may run on (its affinity, as SLURM sets it), at most 8."""
    if workers:
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity outside Linux
        cores = os.cpu_count() or 1
    return min(8, cores)


class ProgressBar(tqdm):
    """tqdm without its monitor thread, which outlives every bar and would keep a later ImagePool from forking."""

    monitor_interval = 0


def _single_threaded() -> bool:
    """True when this process runs one thread, native ones (OpenMP, torch) included; False where unknown."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _start_worker(private_fds: tuple[int, ...], initializer: Callable[..., None] | None, initargs: tuple) -> None:
    for fd in private_fds:
        os.close(fd)
    # A worker of a killed parent would wait for tasks forever (it holds the task pipe's write end too).
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()  # returns when the parent is gone
        os._exit(1)


class ImagePool:
    """Runs one function over items in ``workers`` processes, results in input order; ``workers=1`` runs it here.

    Workers are forked when this process has a single thread (Linux): a fork is ready in milliseconds with
    the decoders already loaded, where a spawned interpreter spends ~0.4 s of CPU importing Pillow, numpy
    (under simplejpeg) and this package, as long as validating 20 of the real printouts takes.
    A fork beside another thread (tqdm's monitor, torch's pools, a caller's threads) could copy a lock that
    thread holds, so then workers are spawned. So enter the pool before starting threads (``ProgressBar``
    starts none), and name in ``private_fds`` descriptors a forked worker must not keep (the shard set's
    lock, which an orphaned worker would go on holding).
    """

    def __init__(self, workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 private_fds: tuple[int, ...] = ()) -> None:
        self.workers = worker_count(workers)
        self._init = initializer, initargs
        self._private_fds = private_fds
        self._executor: ProcessPoolExecutor | None = None
        self.start_method: str | None = None

    def __enter__(self) -> ImagePool:
        initializer, initargs = self._init
        if self.workers == 1:
            if initializer is not None:
                initializer(*initargs)
            return self
        fork = sys.platform == "linux" and _single_threaded()
        self.start_method = "fork" if fork else "spawn"
        if fork:  # load the JPEG decoder once here, not once per worker (numpy under it: ~0.15 s of CPU each).
            # numpy's OpenBLAS may start a thread pool now; it stops that pool around every fork itself
            # (pthread_atfork), so the fork below still happens from a single thread.
            import simplejpeg  # noqa: F401
        self._executor = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context(self.start_method), initializer=_start_worker,
            initargs=(self._private_fds if fork else (), initializer, initargs))
        if fork:
            # The first submit forks every worker now (for "fork" the executor starts them all at once), not
            # later beside the executor's own thread. Frozen, this process's objects are left alone by the
            # workers' garbage collector, so their memory pages stay shared instead of being copied.
            gc.freeze()
            try:
                self._executor.submit(os.getpid)
            finally:
                gc.unfreeze()
        return self

    def release(self) -> None:
        """Let the workers exit now, without waiting for them (leaving the pool waits)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __exit__(self, *exc: Any) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=exc[0] is not None)
            self._executor = None

    def ordered(self, fn: Callable[[Arg], Result], items: Iterable[tuple[Tag, Arg | None]]
                ) -> Iterator[tuple[Tag, Result | None]]:
        """``(tag, fn(arg))`` for each item, in input order; an item with ``arg`` None passes with None.

        At most ``IN_FLIGHT_PER_WORKER`` tasks per worker are submitted ahead, so memory stays bounded.
        """
        if self._executor is None:
            for tag, arg in items:
                yield tag, fn(arg) if arg is not None else None
            return
        yield from in_order(self._executor, fn, items, IN_FLIGHT_PER_WORKER * self.workers)


def in_order(executor: Executor, fn: Callable[[Arg], Result], items: Iterable[tuple[Tag, Arg | None]], ahead: int
             ) -> Iterator[tuple[Tag, Result | None]]:
    """``(tag, fn(arg))`` for each item, run on `executor`, in input order; an item with ``arg`` None passes
    with None. At most `ahead` tasks are submitted before their results are taken, so memory stays bounded
    (and `items` is read lazily: work done while producing an item stays on the calling thread)."""
    window: deque[tuple[Tag, Future | None]] = deque()
    for tag, arg in items:
        window.append((tag, executor.submit(fn, arg) if arg is not None else None))
        while len(window) > ahead:
            done, fut = window.popleft()
            yield done, fut.result() if fut is not None else None
    while window:
        done, fut = window.popleft()
        yield done, fut.result() if fut is not None else None
