"""Pure tensor code of the aggregator: validation, codecs, the server optimizer."""
