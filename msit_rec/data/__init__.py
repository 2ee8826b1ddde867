"""Examples on disk (the data contract) and the batches the model reads from them."""
