"""corpus_documents -> corpus_tokens: the text and its fixed-length token windows."""

import polars as pl
import dagster as dg

from neuron_assets.assets.common import OWNERS
from neuron_assets.automation import ON_CHANGE
from neuron_assets.resources.corpus import CorpusError, CorpusSource, token_windows
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.resources.subject_model import SubjectModel

DOCUMENT_SCHEMA = {"doc_id": pl.String, "text": pl.String}
TOKENS_SCHEMA = {"seq_id": pl.Int32, "doc_id": pl.String, "token_ids": pl.List(pl.Int32), "tokens": pl.List(pl.String)}


@dg.asset(
    deps=["corpus_source"],
    code_version="1",
    kinds={"python", "parquet"},
    owners=OWNERS,
    group_name="corpus",
    description="Documents of the corpus (doc_id, text). Data version: content hash.",
)
def corpus_documents(corpus: CorpusSource, storage: TableStorage) -> dg.MaterializeResult:
    documents = corpus.documents()
    df = pl.DataFrame(documents, schema=DOCUMENT_SCHEMA, orient="row")
    version = storage.write(df, "corpus_documents")
    lengths = df["text"].str.len_chars()
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/row_count": df.height,
            "source": corpus.source,
            "characters": int(lengths.sum()),
            "median document characters": int(lengths.median()),
            "path": dg.MetadataValue.path(str(storage.path("corpus_documents"))),
            "preview": dg.MetadataValue.md("\n\n".join(f"**{d}**: {t[:200]}..." for d, t in documents[:3])),
        },
    )


@dg.asset(
    deps=[corpus_documents, "tokenization"],
    code_version="1",
    automation_condition=ON_CHANGE,
    kinds={"python", "parquet"},
    owners=OWNERS,
    group_name="corpus",
    description="The corpus cut into windows of seq_len tokens of the subject model's tokenizer "
    "(seq_id, doc_id, token_ids, tokens). Data version: content hash.",
)
def corpus_tokens(
    context: dg.AssetExecutionContext, storage: TableStorage, subject_model: SubjectModel, study: Study
) -> dg.MaterializeResult:
    context_length = subject_model.shape().context
    if not 2 <= study.seq_len <= context_length:
        raise CorpusError(
            f"NEURON_ASSETS_SEQ_LEN={study.seq_len} must be between 2 and the subject model's "
            f"context of {context_length} tokens"
        )
    documents = storage.read("corpus_documents").iter_rows()
    windows = token_windows(subject_model.tokenizer(), list(documents), study.seq_len, study.max_windows)
    dropped = windows.pop("dropped_tokens")
    df = pl.DataFrame(windows, schema=TOKENS_SCHEMA)
    if df.height == 0:
        raise CorpusError(
            f"the corpus yields no window of {study.seq_len} tokens: every document is shorter; "
            "lower NEURON_ASSETS_SEQ_LEN or use longer documents"
        )
    version = storage.write(df, "corpus_tokens")
    context.log.info(f"{df.height} windows of {study.seq_len} tokens ({dropped} tail tokens dropped)")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "dagster/row_count": df.height,
            "tokens": df.height * study.seq_len,
            "tail tokens dropped": dropped,
            "seq_len": study.seq_len,
            "tokenizer": subject_model.label,
            "path": dg.MetadataValue.path(str(storage.path("corpus_tokens"))),
            "preview": dg.MetadataValue.md("`" + "".join(df["tokens"][0]).replace("`", "'")[:300] + "`"),
        },
    )
