"""Data layer: read sources (readers), map columns (columns), detect and normalise formats and chats (formats,
chat), render training texts with trained turns marked (render), tokenise with label masks (tokenize) through a
cached datasets.map (cache), batch (collate), mix sources over training (mixture), and summarise a data file
(summary). Knows nothing of models beyond a tokenizer."""
