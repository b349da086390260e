"""The end-to-end demo (`python -m epd_demo`, or `encoder-service-demo`)."""
