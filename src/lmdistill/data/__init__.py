"""Data layer: load and normalise sources (formats, readers), tokenise with label masks (tokenize, render),
batch (collate), mix sources over training (mixture), and summarise a data file (summary).
Knows nothing of models beyond a tokenizer."""
