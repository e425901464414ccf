"""Data side of the trainer: safe image loading, sample normalization, the collator, dataset formats and
the synthetic shapes task. Each module has one job; import from the module itself."""
