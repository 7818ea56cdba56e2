"""CIFAR-10 and CIFAR-100 read from the official "python version" release, without torchvision.

Krizhevsky (2009), "Learning Multiple Layers of Features from Tiny Images". The release is a gzipped tar
holding one folder of pickled dictionaries:

* CIFAR-10, ``cifar-10-batches-py/``: ``data_batch_1`` ... ``data_batch_5`` (10,000 images each),
  ``test_batch`` (10,000) and ``batches.meta`` (``label_names``).
* CIFAR-100, ``cifar-100-python/``: ``train`` (50,000), ``test`` (10,000) and ``meta``
  (``fine_label_names``); the 100 fine labels are used.

In each batch, ``data`` is a ``uint8`` array with one 3072-byte row per image: the 1024 red values, then
the green, then the blue, each a 32x32 image in row-major order, so ``data.reshape(N, 3, 32, 32)`` is the
``(N, C, H, W)`` layout. The pickles were written by Python 2 and are read with ``encoding="bytes"``, so
their keys are ``bytes`` (``b"data"``, ``b"labels"``, ``b"fine_labels"``).

Where to download from is the module-level table ``CIFAR_ARCHIVES``. A mirror is used by passing ``url``
(and its ``md5``) to ``download_cifar`` or to the DataModules, or by replacing the entry in the table.
Pickle runs code from the file it reads, so every file is checked against the md5 of the official release
(``CIFARArchive.file_md5``, the digests torchvision checks too) before it is unpickled; a file that differs
(damaged, truncated, substituted) raises :class:`CIFARIntegrityError` naming it, the expected and the found
digest, and the fix. A file is hashed once per process (cached by path, size and modification time), so the
tasks of a job array sharing one data folder each hash it once. Files you re-packed yourself are read with
``verify=False`` (``verify_files=False`` in the data modules), or registered with their own digests by
replacing the entry of ``CIFAR_ARCHIVES`` (``dataclasses.replace(archive, file_md5=...)``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock


@dataclass(frozen=True)
class CIFARArchive:
    """Where one CIFAR release comes from and how its files are laid out.

    Args:
        url: address of the official ``.tar.gz``.
        md5: hex md5 digest of that file.
        folder: name of the folder the tarball extracts to.
        train_files: pickles holding the training images, in order.
        test_files: pickles holding the test images.
        meta_file: pickle holding the class names.
        label_key: key of the labels in a data pickle.
        names_key: key of the class names in the meta pickle.
        pretty_name: name used in messages.
        file_md5: ``(file, md5)`` of every file of the release, checked before a file is unpickled.

    Example:
        >>> CIFAR_ARCHIVES["cifar10"].folder
        'cifar-10-batches-py'
    """

    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    pretty_name: str
    file_md5: tuple[tuple[str, str], ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the folder must hold."""
        return (*self.train_files, *self.test_files, self.meta_file)

    def expected_md5(self, file: str) -> str | None:
        """The official md5 of ``file``, or None when the table has none."""
        return dict(self.file_md5).get(file)


CIFAR_ARCHIVES: dict[str, CIFARArchive] = {
    "cifar10": CIFARArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        pretty_name="CIFAR-10",
        file_md5=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
            ("test_batch", "40351d587109b95175f43aff81a1287e"),
            ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        ),
    ),
    "cifar100": CIFARArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        pretty_name="CIFAR-100",
        file_md5=(
            ("train", "16019d7e3df5f24257cddd939b257f8d"),
            ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
            ("meta", "7973b15100ade9c7d40fb424638fde48"),
        ),
    ),
}

_DOWNLOAD_TIMEOUT_S = 60
_COPY_BLOCK_BYTES = 1 << 20


class CIFARDownloadError(RuntimeError):
    """Raised when downloading, checking or extracting a CIFAR archive fails; nothing is left behind."""


class CIFARIntegrityError(ValueError):
    """Raised when a CIFAR file on disk is not the official one (its md5 differs) or cannot be read."""


# (path, size, mtime_ns) -> md5 of the files hashed in this process
_VERIFIED_MD5: dict[tuple[str, int, int], str] = {}


def cifar_folder(root: str | os.PathLike, name: str) -> Path:
    """The folder under ``root`` that holds the extracted files of data set ``name``.

    Args:
        root: directory the archive is (or will be) extracted into.
        name: ``"cifar10"`` or ``"cifar100"``.

    Returns:
        ``Path(root) / folder``, e.g. ``data/cifar-10-batches-py``.

    Raises:
        ValueError: if ``name`` is not a key of ``CIFAR_ARCHIVES``.

    Example:
        >>> cifar_folder("data", "cifar100").as_posix()
        'data/cifar-100-python'
    """
    return Path(root) / _archive(name).folder


def cifar_is_present(root: str | os.PathLike, name: str) -> bool:
    """Whether every file of data set ``name`` is present under ``root``.

    Args:
        root: directory the archive was extracted into.
        name: ``"cifar10"`` or ``"cifar100"``.

    Returns:
        ``True`` when the folder holds all of its data and meta files.

    Raises:
        ValueError: if ``name`` is not a key of ``CIFAR_ARCHIVES``.

    Example:
        >>> cifar_is_present("/nonexistent", "cifar10")
        False
    """
    return not _missing_files(cifar_folder(root, name), _archive(name))


def download_cifar(
    root: str | os.PathLike, name: str, url: str | None = None, md5: str | None = None
) -> Path:
    """Download, check and extract the official archive of ``name`` into ``root``, unless already there.

    Concurrent calls on one ``root`` (the tasks of a job array on a shared file system) take turns under a
    lock file ``root/.<folder>.lock`` (removed once the data is there): the first downloads, the others wait
    and find the data present. The
    archive is streamed into a temporary file inside ``root``, its md5 compared with the expected one,
    and it is extracted into a temporary directory inside ``root`` (refusing members with absolute paths,
    ``..`` components, links or devices); the data folder is then moved into place with ``os.replace``.
    On any failure the temporary file and directory are removed, as is ``root`` if this call created it.

    Args:
        root: directory to extract into; created if missing.
        name: ``"cifar10"`` or ``"cifar100"``.
        url: address to download from; defaults to ``CIFAR_ARCHIVES[name].url``.
        md5: expected md5 of the archive; defaults to ``CIFAR_ARCHIVES[name].md5``, also for a custom
            ``url`` (a mirror is expected to serve the official file).

    Returns:
        The data folder, ``cifar_folder(root, name)``.

    Raises:
        ValueError: if ``name`` is unknown.
        CIFARDownloadError: if the download fails (HTTP or network error), the md5 does not match, the
            archive is corrupt or unsafe, or it does not hold the expected files. The message names the
            URL and, for a mismatch, the expected and actual md5.
        FileExistsError: if the data folder exists but is incomplete (delete it and retry).

    Example:
        >>> folder = download_cifar("data", "cifar10")  # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())[:2]  # doctest: +SKIP
        ['batches.meta', 'data_batch_1']
    """
    archive = _archive(name)
    folder = cifar_folder(root, name)
    if cifar_is_present(root, name):
        return folder
    if folder.exists():
        missing = _missing_files(folder, archive)
        raise FileExistsError(
            f"{folder} exists but lacks {missing}; delete it and download {archive.pretty_name} again"
        )
    url = url or archive.url
    md5 = md5 or archive.md5
    created_root = _make_directory(Path(root))
    lock = Path(root) / f".{archive.folder}.lock"
    try:
        with FileLock(lock):  # concurrent jobs (a SLURM array) download once; the others wait, then reuse it
            if not cifar_is_present(root, name):
                _download_and_extract(archive, Path(root), url, md5)
        lock.unlink(missing_ok=True)  # a process still waiting on it re-checks and finds the data
    except BaseException:
        lock.unlink(missing_ok=True)
        _remove_created_directories(created_root, Path(root))
        raise
    return folder


def read_cifar_split(
    root: str | os.PathLike, name: str, split: str, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the official training or test images of ``name`` from the extracted folder under ``root``.

    Args:
        root: directory the archive was extracted into.
        name: ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"`` (50,000 images, batches in order) or ``"test"`` (10,000).
        verify: check each file's md5 against the official release before unpickling it; False only for
            files you re-packed yourself and trust.

    Returns:
        ``(images, labels)``: ``uint8`` tensor ``(N, 3, 32, 32)`` and ``int64`` tensor ``(N,)``
        (CIFAR-100: the fine labels).

    Raises:
        ValueError: if ``name`` or ``split`` is unknown or a file is malformed.
        CIFARIntegrityError: if a file is not the official one (md5) or cannot be unpickled, naming it.
        FileNotFoundError: if a file is missing; the message names the folder and how to get the data.

    Example:
        >>> images, labels = read_cifar_split("data", "cifar10", "test")  # doctest: +SKIP
        >>> images.shape, labels[:3].tolist()  # doctest: +SKIP
        (torch.Size([10000, 3, 32, 32]), [3, 8, 8])
    """
    archive = _archive(name)
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    check_cifar_present(root, name)
    files = archive.train_files if split == "train" else archive.test_files
    parts = [_read_data_file(archive, cifar_folder(root, name) / file, verify) for file in files]
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


def read_cifar_class_names(root: str | os.PathLike, name: str, verify: bool = True) -> list[str]:
    """Read the class names of ``name`` (CIFAR-100: the 100 fine names) from its meta file.

    Args:
        root: directory the archive was extracted into.
        name: ``"cifar10"`` or ``"cifar100"``.
        verify: check the file's md5 against the official release before unpickling it.

    Returns:
        Class names, indexed by label.

    Raises:
        ValueError: if ``name`` is unknown or the meta file is malformed.
        FileNotFoundError: if a file is missing.

    Example:
        >>> read_cifar_class_names("data", "cifar10")[:3]  # doctest: +SKIP
        ['airplane', 'automobile', 'bird']
    """
    archive = _archive(name)
    check_cifar_present(root, name)
    meta = _load_pickle(archive, cifar_folder(root, name) / archive.meta_file, verify)
    if archive.names_key not in meta:
        raise ValueError(f"{archive.meta_file} has no key {archive.names_key!r}: not the official format")
    return [_as_text(class_name) for class_name in meta[archive.names_key]]


def check_cifar_present(root: str | os.PathLike, name: str) -> None:
    """Raise a ``FileNotFoundError`` explaining the ways out unless every file of ``name`` is there.

    Args:
        root: directory the archive was extracted into.
        name: ``"cifar10"`` or ``"cifar100"``.

    Raises:
        FileNotFoundError: naming the folder looked in, the missing files, ``download=True`` and the
            synthetic ``SyntheticCIFARDataModule``.
        ValueError: if ``name`` is unknown.

    Example:
        >>> check_cifar_present("/nonexistent", "cifar10")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: CIFAR-10 not found in /nonexistent/cifar-10-batches-py ...
    """
    if cifar_is_present(root, name):
        return
    archive = _archive(name)
    folder = cifar_folder(root, name)
    missing = _missing_files(folder, archive)
    raise FileNotFoundError(
        f"{archive.pretty_name} not found in {folder} (missing: {', '.join(missing)}). Either pass "
        f"`download=True` to fetch it from {archive.url} into {Path(root)}, or train on the synthetic "
        f"stand-in `SyntheticCIFARDataModule`, which needs no files."
    )


def _archive(name: str) -> CIFARArchive:
    if name not in CIFAR_ARCHIVES:
        raise ValueError(f"`name` must be one of {sorted(CIFAR_ARCHIVES)}, got {name!r}")
    return CIFAR_ARCHIVES[name]


def _read_data_file(archive: CIFARArchive, path: Path, verify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    label_key = archive.label_key
    batch = _load_pickle(archive, path, verify)
    if b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path} lacks the keys b'data' and {label_key!r}: not the official format")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = torch.as_tensor(np.asarray(batch[label_key], dtype=np.int64))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
        raise ValueError(
            f"{path}: expected {len(labels)} rows of 3072 bytes, got a data array of shape {data.shape}"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, labels


def _file_md5(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED_MD5:
        digest = hashlib.md5()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(_COPY_BLOCK_BYTES), b""):
                digest.update(block)
        _VERIFIED_MD5[key] = digest.hexdigest()
    return _VERIFIED_MD5[key]


def _fix(archive: CIFARArchive, path: Path) -> str:
    return (
        f"Remove {path.parent} and pass `download=True` (it extracts the official archive {archive.url} "
        "again), or extract that archive yourself; for files you re-packed and trust, pass `verify=False` "
        "(`verify_files=False` in the data modules)."
    )


def _load_pickle(archive: CIFARArchive, path: Path, verify: bool) -> dict:
    expected = archive.expected_md5(path.name)
    if verify and expected is not None:
        found = _file_md5(path)
        if found != expected:
            raise CIFARIntegrityError(
                f"{path} is not the official {archive.pretty_name} file {path.name!r}: md5 {found}, expected "
                f"{expected}. It is damaged, truncated or was replaced, and is not unpickled (unpickling runs "
                f"code from the file). {_fix(archive, path)}"
            )
    try:
        with open(path, "rb") as file:
            content = pickle.load(file, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as error:
        raise CIFARIntegrityError(
            f"{path} cannot be read as a {archive.pretty_name} batch ({type(error).__name__}: {error}). "
            f"{_fix(archive, path)}"
        ) from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} does not hold a dictionary: not the official format")
    return content


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _download_and_extract(archive: CIFARArchive, root: Path, url: str, md5: str) -> None:
    download_fd, download_name = tempfile.mkstemp(prefix=f".{archive.folder}-", suffix=".tar.gz", dir=root)
    extract_dir = None
    try:
        with os.fdopen(download_fd, "wb") as download_file:
            actual_md5 = _fetch(url, download_file)
        if actual_md5 != md5.lower():
            raise CIFARDownloadError(
                f"md5 mismatch for the {archive.pretty_name} archive downloaded from {url}: "
                f"expected {md5.lower()}, got {actual_md5}. The download is corrupt or the mirror serves "
                f"another file; nothing was kept."
            )
        extract_dir = tempfile.mkdtemp(prefix=f".{archive.folder}-extract-", dir=root)
        _safe_extract(Path(download_name), Path(extract_dir), url)
        _move_into_place(archive, Path(extract_dir), root, url)
    finally:
        Path(download_name).unlink(missing_ok=True)
        if extract_dir is not None:
            shutil.rmtree(extract_dir, ignore_errors=True)


def _fetch(url: str, destination) -> str:
    """Stream ``url`` into the open binary file ``destination``; return the md5 of what was written."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            while block := response.read(_COPY_BLOCK_BYTES):
                digest.update(block)
                destination.write(block)
    except urllib.error.HTTPError as error:
        raise CIFARDownloadError(f"download of {url} failed: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise CIFARDownloadError(f"download of {url} failed: {error}") from error
    return digest.hexdigest()


def _safe_extract(tarball: Path, destination: Path, url: str) -> None:
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, url)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(destination, members=members, filter="data")
            else:  # Python without extraction filters; the members were checked above
                tar.extractall(destination, members=members)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise CIFARDownloadError(f"archive downloaded from {url} could not be extracted: {error}") from error


def _check_member(member: tarfile.TarInfo, url: str) -> None:
    path = Path(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise CIFARDownloadError(f"archive from {url} holds an unsafe path {member.name!r}; refused")
    if not (member.isfile() or member.isdir()):
        raise CIFARDownloadError(f"archive from {url} holds a link or special file {member.name!r}; refused")


def _move_into_place(archive: CIFARArchive, extract_dir: Path, root: Path, url: str) -> None:
    extracted = extract_dir / archive.folder
    missing = _missing_files(extracted, archive)
    if missing:
        raise CIFARDownloadError(
            f"archive downloaded from {url} has no {archive.folder}/ folder with {missing}"
        )
    try:
        os.replace(extracted, root / archive.folder)
    except OSError:
        if _missing_files(root / archive.folder, archive):
            raise
        # another process extracted the same data first: keep its copy


def _missing_files(folder: Path, archive: CIFARArchive) -> list[str]:
    return [file for file in archive.files if not (folder / file).is_file()]


def _make_directory(path: Path) -> Path | None:
    """Create ``path`` with its parents; return the top-most directory this created, or ``None``."""
    missing_ancestors = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return missing_ancestors[-1] if missing_ancestors else None


def _remove_created_directories(top_created: Path | None, path: Path) -> None:
    """Remove the empty directories from ``path`` up to ``top_created`` (those ``_make_directory`` made)."""
    if top_created is None:
        return
    for directory in (path, *path.parents):
        try:
            directory.rmdir()
        except OSError:
            return
        if directory == top_created:
            return
