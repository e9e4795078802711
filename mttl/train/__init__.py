"""Multi-task pre-training on Ray Train workers, one DeepSpeed engine each (`mttl pretrain`)."""
