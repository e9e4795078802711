"""Task data: preparing sources (NI, T0, CrossFit, synthetic) into Parquet shards and streaming them.

`shards` owns the on-disk format every source writes and every reader reads.
"""
