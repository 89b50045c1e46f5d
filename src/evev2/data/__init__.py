"""Data: image preprocessing, templates and the processor, record sources, packing and the step loader."""
