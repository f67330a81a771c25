"""Models: the frozen image encoder, the LSTM decoder, search and the LightningModule."""
