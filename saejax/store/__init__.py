"""The activation store: harvest (model -> shards), writer, manifest, reader. Format: docs/store.md."""
from saejax.store.manifest import StoreError
from saejax.store.reader import Reader, Store, check_store, open_store
from saejax.store.writer import write_store

__all__ = ["StoreError", "Store", "Reader", "open_store", "check_store", "write_store"]
