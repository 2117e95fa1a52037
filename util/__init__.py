"""What a reader of the method may skip: reading any checkpoint (ours and the official UMT layouts) into a model, and
the evaluation helpers that the training scripts and evaluate.py share."""
