"""Backbones: any timm model by name or checkpoint (`loading`), the embedded zoo and its weights (`assets/`), the
video ViTs (`video`). Imports only `tokenbench.reduce` below it."""
