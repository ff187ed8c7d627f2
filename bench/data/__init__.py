"""Datasets by name (`registry`), image datasets (`images`), video datasets (`video`) and the decode-once image
store (`store`). Imports `models` (for each model's preprocessing) and below."""
