"""Parquet tables, one file per asset partition, under a storage root."""

import hashlib
import io
import os
import uuid

import polars as pl
from dagster import ConfigurableResource
from upath import UPath


class TableStorage(ConfigurableResource):
    """`{root}/{asset}/{partition}/{table}.parquet`; a multi-partition 'layer|shard' is 'layer/shard'."""

    root: str = "data"

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
        target = self.path(asset, partition, table)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.protocol in ("", "file", "local"):
            # temp file then rename: readers never see a half-written table
            temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            temp.write_bytes(payload)
            os.replace(temp.path, target.path)
        else:
            target.write_bytes(payload)  # one PUT: object stores never expose partial objects
        return hashlib.sha256(payload).hexdigest()[:16]

    def read(self, asset: str, partition: str | None = None, table: str = "data",
             columns: list[str] | None = None) -> pl.DataFrame:
        target = self.path(asset, partition, table)
        if not target.exists():
            where = f"partition {partition}" if partition else "it"
            raise FileNotFoundError(
                f"{asset} has no table at {target}: materialize {where} first "
                f"(dagster asset materialize --select {asset}"
                + (f" --partition '{partition}')" if partition else ")")
            )
        return pl.read_parquet(target.read_bytes(), columns=columns)

    def exists(self, asset: str, partition: str | None = None, table: str = "data") -> bool:
        return self.path(asset, partition, table).exists()
