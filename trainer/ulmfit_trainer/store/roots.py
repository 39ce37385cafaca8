"""Opening a store from its root (a directory, ``file://`` or ``s3://bucket/prefix``), and moving
single files or trees to and from a URI (`fetch`, `publish`)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.store.base import Store, check_key
from ulmfit_trainer.store.errors import StoreError
from ulmfit_trainer.store.local import LocalStore
from ulmfit_trainer.store.s3 import S3Store


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise StoreError(f"not an s3:// URI: {uri!r}")
    return parts.netloc, parts.path.strip("/")


def open_store(root: str | Path, s3: S3Settings | None = None) -> Store:
    """The store at `root`: a local directory (a path or `file://` URI) or `s3://bucket/prefix`.

    For an `s3://` root, `s3` supplies the connection (endpoint, TLS, credential variables,
    tuning); the bucket and prefix come from the URI. An empty root means `s3.root`.
    """
    root = str(root)
    if not root:
        if s3 is None:
            raise StoreError("no store root: give a directory, an s3:// URI or S3 settings")
        root = s3.root
    if root.startswith("s3://"):
        bucket, prefix = split_s3_uri(root)
        if s3 is None:
            raise StoreError(f"store root {root} is on S3 but no S3 settings (endpoint) were given")
        try:
            settings = s3.model_copy(update={"bucket": bucket, "prefix": prefix})
            settings = S3Settings.model_validate(settings.model_dump())
        except ValueError as exc:
            raise StoreError(f"invalid store root {root!r}: {exc}") from exc
        return S3Store(settings)
    if root.startswith("file://"):
        root = urlsplit(root).path
    elif "://" in root:
        raise StoreError(f"unsupported store root {root!r}: use a directory or s3://bucket/prefix")
    return LocalStore(root)


def _store_for(uri: str, s3: S3Settings | None) -> tuple[Store, str]:
    """A store rooted at the bucket of an `s3://` URI, and the key the URI names in it."""
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        return open_store(f"s3://{bucket}", s3), key
    raise StoreError(f"not an s3:// URI: {uri!r}")


def fetch(
    uri: str | Path, dest: str | Path, s3: S3Settings | None = None, *, field: str = "pretrained"
) -> Path:
    """Make the file or directory at `uri` available locally and return its local path.

    A local path (or `file://` URI) is returned as it is. An `s3://` URI naming one object is
    downloaded to `dest` (into it, when `dest` is an existing directory); one naming a prefix is
    downloaded as a directory tree to `dest`. A `builtin://NAME` backbone is the directory its
    installed package ships, an `hf://ORG/NAME[@REVISION]` one its snapshot in the Hugging Face
    cache (neither is copied to `dest`). `field` is the spec field `uri` came from, for errors.
    """
    uri = str(uri)
    if uri.startswith(("builtin://", "hf://")):
        # Imported here: only a pretrained backbone needs it, and it may import huggingface_hub.
        from ulmfit_trainer.backbones import resolve

        return resolve(uri, field)
    if not uri.startswith("s3://"):
        return Path(urlsplit(uri).path if uri.startswith("file://") else uri)
    store, key = _store_for(uri, s3)
    dest = Path(dest)
    if key and store.exists(key):
        target = dest / key.rsplit("/", 1)[-1] if dest.is_dir() else dest
        store.get_file(key, target)
        return target
    if not key:
        raise StoreError(f"{uri} names a whole bucket; give a prefix")
    store.get_dir(key, dest)
    return dest


def publish(src: str | Path, uri: str, s3: S3Settings | None = None) -> str:
    """Upload a local file or directory to `uri` (`s3://...` or a local path); returns `uri`."""
    src = Path(src)
    if uri.startswith("s3://"):
        store, key = _store_for(uri, s3)
        if src.is_dir():
            store.put_dir(key, src)
        else:
            store.put_file(check_key(key), src)
        return uri
    target = Path(urlsplit(uri).path if uri.startswith("file://") else uri)
    if src.is_dir():
        LocalStore(target).put_dir("", src)
    else:
        LocalStore(target.parent).put_file(target.name, src)
    return uri
