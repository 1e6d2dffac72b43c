"""Parquet tables, one file per asset partition, under a storage root."""

import hashlib
import io

import polars as pl
from dagster import ConfigurableResource, InitResourceContext
from upath import UPath

from neuron_assets.resources.files import StorageError, check_s3_root, s3_errors, write_atomic


# Columns renamed since tables were first written, old name -> new: a table written before reads as if
# written now (its asset is stale by its code version; reading it is what reuses its rows).
RENAMED = {"neuron": "unit", "donor_neuron": "donor_unit", "neurons": "units"}


def _current_names(payload: bytes, columns: list[str] | None) -> pl.DataFrame:
    """The table in `payload`, its renamed columns under their current names, only `columns` if given."""
    old = {new: name for name, new in RENAMED.items() if name in pl.read_parquet_schema(io.BytesIO(payload))}
    table = pl.read_parquet(payload, columns=[old.get(c, c) for c in columns] if columns else None)
    return table.rename({name: new for new, name in old.items()}, strict=False)


class TableStorage(ConfigurableResource):
    """`{root}/{asset}/{partition}/{table}.parquet`; a multi-partition 'layer|shard' is 'layer/shard'."""

    root: str = "data"

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # An unreachable, refused or missing s3:// root fails the step before any work.
        check_s3_root(self.root)

    def path(self, asset: str, partition: str | None = None, table: str = "data") -> UPath:
        folder = UPath(self.root) / asset
        if partition:
            folder = folder.joinpath(*partition.split("|"))
        return folder / f"{table}.parquet"

    def write(self, df: pl.DataFrame, asset: str, partition: str | None = None, table: str = "data") -> str:
        """Write atomically and return the content hash (the Dagster data version)."""
        buffer = io.BytesIO()
        df.write_parquet(buffer, statistics=False)
        payload = buffer.getvalue()
        write_atomic(self.path(asset, partition, table), payload)
        return hashlib.sha256(payload).hexdigest()[:16]

    def write_tables(self, tables: dict[str, pl.DataFrame], asset: str, partition: str | None = None) -> str:
        """Write a partition of several tables, each as `write` does, and remove any other table file
        of the partition (one an older code version wrote): the folder then holds exactly the tables
        whose hashes the materialization records. Returns their content hashes, concatenated."""
        hashes = "".join(self.write(df, asset, partition, table) for table, df in tables.items())
        folder = self.path(asset, partition).parent
        with s3_errors(str(folder), "clean"):
            for path in folder.glob("*.parquet"):
                if path.stem not in tables:
                    path.unlink()
        return hashes

    def read(self, asset: str, partition: str | None = None, table: str = "data",
             columns: list[str] | None = None) -> pl.DataFrame:
        target = self.path(asset, partition, table)
        where = f"partition {partition}" if partition else "it"
        command = f"dagster asset materialize --select {asset}" + (f" --partition '{partition}'" if partition else "")
        if not self.exists(asset, partition, table):
            raise FileNotFoundError(f"{asset} has no table at {target}: materialize {where} first ({command})")
        with s3_errors(str(target), "read"):
            payload = target.read_bytes()
        try:
            return _current_names(payload, columns)
        except pl.exceptions.ComputeError as error:  # damaged after it was written: writes are whole
            raise StorageError(
                f"the table {target} under NEURON_ASSETS_STORAGE is not readable Parquet ({error}); "
                f"delete it and materialize {where} again ({command})"
            ) from None

    def exists(self, asset: str, partition: str | None = None, table: str = "data") -> bool:
        target = self.path(asset, partition, table)
        with s3_errors(str(target), "look for"):
            return target.exists()
