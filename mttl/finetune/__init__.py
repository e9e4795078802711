"""Few-shot adaptation of a pre-trained run to one held-out task: finetune types, losses, loop, `mttl finetune`."""
