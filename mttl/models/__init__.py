"""Models: backbone loading (`backbone.py`), tokenizers (`tokenizer.py`), the task-id routed
wrapper (`routed.py`) and run folders read back (`run.py`)."""
