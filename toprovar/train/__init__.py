"""Training the project's small models: the shapes tokenizer and transformer (``tools/train_small.py``)."""
