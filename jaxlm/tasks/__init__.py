"""Fine-tuning tasks: readers, preprocessing and official metrics (GLUE, CoNLL-2003, SQuAD)."""
