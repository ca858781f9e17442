"""The bottom layer, importing nothing above it: part specs (Configurable, build from an allow-list), errors,
checkpoint files, ownership locks, derived seeds, image resizing and small tensor helpers."""
