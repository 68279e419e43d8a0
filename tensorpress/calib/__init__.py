"""Calibration: data (``data``), statistics collectors (``collectors``) and the layer-sequential
pipeline that feeds every compressor (``pipeline``)."""
