"""The HDF5 feature cache (schema v2): the only package that touches h5py.

The written schema is ``docs/cache-format.md``; every change here must keep it exact and bump
:data:`SCHEMA_VERSION` when old readers would misread a file. Files of schema 1 are still read.

Modules, each importing only those listed before it:

* :mod:`~pipeline.cache.format` -- schema version, format name, the signature keys, row fields, dataset names;
* :mod:`~pipeline.cache.names` -- the cache's file name, its parts folder, lock and temporary names (name limit);
* :mod:`~pipeline.cache.faults` -- one-line errors for failed writes and damaged files, the rebuild command;
* :mod:`~pipeline.cache.rows` -- how rows and root attributes are stored, the rows' digest;
* :mod:`~pipeline.cache.write` -- part files, assembly of the complete file, the lock;
* :mod:`~pipeline.cache.read` -- opening with every check, features on demand, folder scans, what a run left.

Every public name (:data:`__all__`) is importable from here (``from pipeline.cache import open_features``,
``cache.assemble``). A name set on this package is only set here: the package's modules look up their own names,
so a test that stands in for one of their parts patches it in the module that calls it.

Identity
--------
A cache belongs to one dataset folder: its file name carries a digest of the folder's resolved path besides the
folder's name, and the folder is recorded in the file, so two projects whose image folders share a name never
overwrite or reuse each other's cache.

Integrity
---------
Every fixed-size dataset (features, views, labels, sizes, flags) is chunked with HDF5's Fletcher-32 checksum,
which HDF5 verifies on every read of a chunk; the row metadata as a whole (paths, splits, errors included) has a
SHA-256 stored at assembly and checked on every read; file metadata is checksummed by the HDF5 1.10 file format.
A damaged file is reported in one line (what is damaged and what to do), never read as numbers. Features that are
not finite never enter a cache as usable rows. A ``content_sha256`` (rows and features as written) identifies the
content for provenance without hashing the file again.

Crash safety
------------
A cache file at its final name is always complete: it is written under a temporary name and moved into place with
an atomic rename, and carries ``complete = True``. While an extraction runs, finished rows go to small *part* files
in ``<cache>.parts/``, each also written to a temporary name and renamed, so a run killed at any moment (SIGKILL
included) leaves only whole parts. The next identical command reuses them and extracts only what is missing; when
all rows are done, the final file is assembled (old rows that are still valid + parts) and the parts are removed.
The assembled file lists the parts it consumed, so parts left behind by a kill between the rename and their removal
are recognised as already assembled. Write failures (disk full, read-only or unwritable folder) remove the
temporary file, keep every finished part and raise one clear line.
"""

from __future__ import annotations

from pipeline.cache.faults import DamagedCache, corrupt_error, rebuild_command, write_error
from pipeline.cache.format import (
    FEATURE_KINDS, FORMAT_NAME, LIBVER, READABLE_VERSIONS, ROW_FIELDS, SCHEMA_VERSION, SIGNATURE_KEYS, Signature,
)
from pipeline.cache.names import NAME_MAX, cache_path, check_name_fits, dataset_id, name_max, parts_dir, \
    sibling_name, temp_path
from pipeline.cache.read import (
    CacheInfo, CacheScan, FeatureReader, FeatureSet, check_expected, open_features, parts_views,
    read_features, read_meta, read_rows, scan_existing, scan_folder, source_shapes, verify,
)
from pipeline.cache.rows import Existing, RowRecord, Rows
from pipeline.cache.write import FREE_SPACE_MARGIN, PartWriter, assemble, discard, locked, remove_parts

__all__ = [
    "SCHEMA_VERSION", "READABLE_VERSIONS", "FORMAT_NAME", "FEATURE_KINDS", "LIBVER", "SIGNATURE_KEYS", "ROW_FIELDS",
    "Signature", "FREE_SPACE_MARGIN", "NAME_MAX", "dataset_id", "cache_path", "parts_dir", "name_max",
    "sibling_name", "temp_path", "check_name_fits", "write_error", "corrupt_error", "rebuild_command", "DamagedCache",
    "Rows", "RowRecord", "Existing", "PartWriter", "assemble", "remove_parts", "discard", "locked", "FeatureSet",
    "FeatureReader", "read_meta", "check_expected", "open_features", "read_features", "read_rows", "CacheInfo",
    "CacheScan", "scan_folder", "scan_existing", "source_shapes", "parts_views", "verify",
]
