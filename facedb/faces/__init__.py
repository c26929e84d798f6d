"""Photo to template: loading images, detecting and aligning faces, the embedding models, quality."""
