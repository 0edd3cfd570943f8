"""Full fits on Spark MLlib's ALS (`COFEAT_FACTORS_ENGINE=spark`), for clusters.

The refresh machine still reads the store, weighs, holds out and filters (one definition of
the training matrix for both engines); only the fit, the part that grows with non-zeros x
factors^2 per iteration, moves. The matrix goes to Spark as Parquet in
`COFEAT_SPARK_EXCHANGE_DIR` (a path every executor sees: HDFS, S3, NFS), and the factors
come back the same way, as a cluster job would move them.

The same objective as implicit's, in Spark's terms:
- confidence: Spark's implicit ALS uses c = 1 + alpha * r for r > 0. We hand it
  r = log(1 + s / eps) and alpha = COFEAT_ALS_ALPHA, so c is exactly the confidence the
  implicit engine trains on (docs/factors.md, "Weigh").
- regularization: Spark multiplies regParam by each row's number of ratings (ALS-WR);
  implicit adds a constant lambda. regParam = lambda * (users + projects) / (2 * nnz) gives
  the same total regularization over all rows.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from shared.settings import Settings

log = logging.getLogger(__name__)


def reg_param(regularization: float, matrix: sp.csr_matrix) -> float:
    """Spark's regParam that matches implicit's constant lambda on this matrix, on average."""
    rows = matrix.shape[0] + matrix.shape[1]
    return regularization * rows / (2 * max(matrix.nnz, 1))


def exchange_dir(settings: Settings) -> Path:
    return Path(settings.spark_exchange_dir or settings.data_dir / "spark")


def fit_full(matrix: sp.csr_matrix, params, alpha: float,
             settings: Settings) -> tuple[np.ndarray, np.ndarray, dict]:
    """(user factors, item factors, what to record) for the confidence matrix `matrix`."""
    run = exchange_dir(settings) / f"run-{uuid.uuid4().hex[:12]}"
    run.mkdir(parents=True)
    reg = reg_param(params.regularization, matrix)
    try:
        _write_ratings(matrix, alpha, run / "ratings")
        spark = _session(settings, run)
        try:
            _fit(spark, params, alpha, reg, run)
        finally:
            spark.stop()
        users = _read_factors(run / "users", matrix.shape[0], params.factors)
        items = _read_factors(run / "items", matrix.shape[1], params.factors)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return users, items, {"master": settings.spark_master, "reg_param": reg}


def _write_ratings(matrix: sp.csr_matrix, alpha: float, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir()
    coo = matrix.tocoo()
    # Back from confidence to Spark's rating: c = 1 + alpha * r.
    rating = ((coo.data.astype(np.float64) - 1.0) / alpha).astype(np.float32)
    table = pa.table({"user": coo.row.astype(np.int32), "item": coo.col.astype(np.int32),
                      "rating": rating})
    pq.write_table(table, path / "part-0.parquet", row_group_size=1 << 20)


def _session(settings: Settings, run: Path):
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master(settings.spark_master)
               .appName("cofeat-factors")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "8"))
    for key, value in settings.spark_conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    # Long lineages of many iterations overflow the stack without checkpoints.
    spark.sparkContext.setCheckpointDir(str(run / "checkpoints"))
    return spark


def _fit(spark, params, alpha: float, reg: float, run: Path) -> None:
    from pyspark.ml.recommendation import ALS

    ratings = spark.read.parquet(str(run / "ratings"))
    als = ALS(rank=params.factors, maxIter=params.iterations, regParam=reg, alpha=alpha,
              implicitPrefs=True, nonnegative=False, seed=params.seed, userCol="user",
              itemCol="item", ratingCol="rating", checkpointInterval=5)
    log.info("Spark ALS: rank %d, %d iterations, regParam %.5g, alpha %g on %s",
             params.factors, params.iterations, reg, alpha, spark.sparkContext.master)
    model = als.fit(ratings)
    model.userFactors.write.parquet(str(run / "users"))
    model.itemFactors.write.parquet(str(run / "items"))


def _read_factors(path: Path, n: int, k: int) -> np.ndarray:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    ids = table.column("id").to_numpy()
    features = table.column("features").combine_chunks()
    values = features.values.to_numpy(zero_copy_only=False).astype(np.float32)
    out = np.zeros((n, k), np.float32)  # a row Spark saw no rating for keeps zeros
    out[ids] = values.reshape(len(ids), k)
    return out
