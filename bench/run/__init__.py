"""Running work: the sweep (`sweep`), its option checks (`limits`), scale-out (`distributed`), training
(`training`), speed studies (`speed`) and the GPU suite (`suite`)."""
