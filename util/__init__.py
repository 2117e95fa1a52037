"""What a reader of the method may skip: reading any checkpoint, ours and the official UMT layouts
(checkpoints.py), the paper's BERT text side and its tokenizer (bert.py, wordpiece.py), the
evaluation helpers that the training scripts and the evaluation commands share (evaluation.py), and
the scripts' settings (configurator.py)."""
