"""encoder-service: a disaggregated, ragged vision-encoder service for VLM serving."""

__version__ = "0.1.0"
