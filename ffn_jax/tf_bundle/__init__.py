"""Reading TensorFlow checkpoints without TensorFlow, one format per module.

- ``wire``: the protocol-buffer wire format (varints, messages);
- ``crc``: CRC-32C and its mask;
- ``snappy``: raw snappy blocks;
- ``sstable``: LevelDB-format tables (the ``.index`` file);
- ``bundle``: tensor bundles (``BundleReader``: variable names, shapes, dtypes, arrays).
"""
from ffn_jax.tf_bundle.bundle import BundleEntry, BundleReader
from ffn_jax.tf_bundle.crc import crc32c
from ffn_jax.tf_bundle.sstable import read_table
from ffn_jax.tf_bundle.wire import FormatError

__all__ = ["BundleEntry", "BundleReader", "FormatError", "crc32c", "read_table"]
